//! Scenarios through the whole watch: hand-built transitions, ticks with fd
//! samples, and what the user would see.

use std::collections::HashMap;
use std::time::Duration;

use tracer_common::OwnerSource;

use super::*;
use crate::model::{Alert, AlertKind, AlertState};
use crate::output::{
    json::json_lines,
    table::{self, TableStyle},
};
use crate::tcp::CloseCause;
use crate::tcp::TcpState::{self, *};

const MS: u64 = 1_000_000;
const S: u64 = 1_000 * MS;
/// ktime when socktrace started.
const START: u64 = 10_000 * S;

const CLIENT_IP: &str = "10.0.0.1";
const SERVER: &str = "10.0.0.5:17000";

/// A process, or the softirq context (`pid: None`) in which packet-driven
/// transitions run.
#[derive(Clone, Copy)]
struct Actor {
    pid: Option<u32>,
    comm: &'static str,
}

const RULER: Actor = Actor {
    pid: Some(4242),
    comm: "ruler",
};
const SOFTIRQ: Actor = Actor {
    pid: None,
    comm: "swapper/0",
};

impl Actor {
    fn event(
        self,
        at: u64,
        sock_id: u64,
        ends: (&str, &str),
        states: (TcpState, TcpState),
    ) -> Transition {
        Transition {
            ktime_ns: at,
            sock_id,
            owner: Owner {
                pid: self.pid,
                nspid: None,
                comm: self.comm.into(),
                source: OwnerSource::Unknown,
            },
            local: ends.0.parse().unwrap(),
            remote: ends.1.parse().unwrap(),
            old: states.0,
            new: states.1,
            dwell_ns: None,
            cause: None,
        }
    }
}

fn local_end(sock_id: u64) -> String {
    format!("{CLIENT_IP}:{}", 30_000 + sock_id % 30_000)
}

/// Active open: the local port is assigned only after CLOSE -> SYN_SENT.
fn connect(watch: &mut Watch, actor: Actor, sock_id: u64, at: u64, remote: &str) {
    watch.on_transition(&actor.event(at, sock_id, ("0.0.0.0:0", remote), (Close, SynSent)));
    let local = local_end(sock_id);
    watch.on_transition(&SOFTIRQ.event(at + MS, sock_id, (&local, remote), (SynSent, Established)));
}

/// The peer's FIN arrives (softirq).
fn peer_fin(watch: &mut Watch, sock_id: u64, at: u64, ends: (&str, &str)) {
    watch.on_transition(&SOFTIRQ.event(at, sock_id, ends, (Established, CloseWait)));
}

/// The owner closes after the peer's FIN: CLOSE_WAIT -> LAST_ACK -> CLOSE.
fn close_after_fin(watch: &mut Watch, actor: Actor, sock_id: u64, at: u64, ends: (&str, &str)) {
    watch.on_transition(&actor.event(at, sock_id, ends, (CloseWait, LastAck)));
    watch.on_transition(&SOFTIRQ.event(at + MS, sock_id, ends, (LastAck, Close)));
}

/// The owner closes first; the socket ends when the peer's FIN comes and the
/// TIME_WAIT mini socket takes over.
fn close_first(watch: &mut Watch, actor: Actor, sock_id: u64, at: u64, ends: (&str, &str)) {
    watch.on_transition(&actor.event(at, sock_id, ends, (Established, FinWait1)));
    watch.on_transition(&SOFTIRQ.event(at + MS, sock_id, ends, (FinWait1, FinWait2)));
    watch.on_transition(&SOFTIRQ.event(at + 2 * MS, sock_id, ends, (FinWait2, Close)));
}

fn tick(watch: &mut Watch, at: u64, fds: &[(u32, u64, u64)], lost: u64) -> Snapshot {
    let samples: HashMap<u32, ProcSample> = fds
        .iter()
        .map(|&(pid, fds, soft_limit)| {
            (
                pid,
                ProcSample {
                    fds,
                    soft_limit,
                    hard_limit: soft_limit * 4,
                },
            )
        })
        .collect();
    watch.tick(at, &samples, lost)
}

fn report(snapshot: &Snapshot, pid: u32) -> &ProcessReport {
    snapshot
        .processes
        .iter()
        .find(|report| report.pid == pid)
        .unwrap()
}

fn all_alerts(snapshots: &[Snapshot]) -> Vec<&Alert> {
    snapshots.iter().flat_map(|s| &s.new_alerts).collect()
}

/// The story of the issue: `ruler` opens 10 connections/s to the server and
/// never closes them; the server hangs up each after 2 s idle, so they pile
/// up in CLOSE_WAIT and fds grow toward the soft limit of 400 (reached at
/// 35 s). Ticks every second; `lost` events reported from the start.
fn leak(config: WatchConfig, seconds: u64, lost: u64) -> Vec<Snapshot> {
    let mut watch = Watch::new(config, START);
    let mut snapshots = Vec::new();
    let step = 100 * MS;
    for k in 0..seconds * 10 {
        let at = START + k * step;
        connect(&mut watch, RULER, k, at, SERVER);
        if k >= 20 {
            let old = k - 20;
            peer_fin(&mut watch, old, at + 2 * MS, (&local_end(old), SERVER));
        }
        if (k + 1) % 10 == 0 {
            let now = at + step - MS;
            let fds = 50 + k + 1;
            snapshots.push(tick(&mut watch, now, &[(4242, fds, 400)], lost));
        }
    }
    snapshots
}

#[test]
fn leak_alerts_with_pid_peer_and_evidence() {
    let config = WatchConfig {
        close_wait_age: Duration::from_secs(5),
        ..WatchConfig::default()
    };
    let snapshots = leak(config, 30, 0);
    let alerts = all_alerts(&snapshots);

    let fd = alerts
        .iter()
        .find(|alert| alert.kind == AlertKind::FdExhaustion)
        .expect("fd exhaustion alert");
    assert_eq!(fd.pid, 4242);
    assert_eq!(fd.comm, "ruler");
    assert_eq!(fd.remote.as_deref(), Some(SERVER));
    assert!(
        fd.message.starts_with("pid 4242 (ruler): fds "),
        "{}",
        fd.message
    );
    assert!(
        fd.message.contains("rising 10/s → limit in ~"),
        "{}",
        fd.message
    );
    assert!(
        fd.message.contains(&format!("held to {SERVER}")),
        "{}",
        fd.message
    );

    let close_wait = alerts
        .iter()
        .find(|alert| alert.kind == AlertKind::CloseWait)
        .expect("CLOSE_WAIT alert");
    assert_eq!(close_wait.remote.as_deref(), Some(SERVER));
    let message = &close_wait.message;
    assert!(
        message.contains(&format!("sockets to {SERVER} in CLOSE_WAIT, oldest ")),
        "{message}"
    );
    assert!(
        message.contains("the peer closed first in 100%"),
        "{message}"
    );
    assert!(
        message.contains("the peer closes idle connections after ≈2.0 s"),
        "{message}"
    );
    assert!(!message.contains("lost"), "{message}");

    // The process is reported worst first with its peer.
    let last = snapshots.last().unwrap();
    let ruler = &last.processes[0];
    assert_eq!(ruler.pid, 4242);
    assert!(
        (ruler.connects_per_s - 10.0).abs() < 0.5,
        "{}",
        ruler.connects_per_s
    );
    assert_eq!(ruler.closes_per_s, 0.0);
    assert_eq!(ruler.held, 300);
    assert_eq!(ruler.close_wait, 280);
    assert!((ruler.close_wait_oldest_s.unwrap() - 28.0).abs() < 0.2);
    let peer = &ruler.peers[0];
    assert_eq!(
        (peer.remote.as_str(), peer.opened, peer.held),
        (SERVER, 300, 300)
    );
    assert_eq!(peer.peer_closed_first, 280);
    assert!((peer.peer_idle_timeout_s.unwrap() - 2.0).abs() < 0.1);
}

#[test]
fn leak_eta_midway_is_within_a_quarter() {
    let snapshots = leak(WatchConfig::default(), 30, 0);
    // The fd forecast is available after a short warm-up ...
    assert!(snapshots[6].processes[0].eta_s.is_some());
    // ... and midway (t = 17 s, limit reached at 35 s) it is about right.
    let midway = &snapshots[16].processes[0];
    let remaining = 35.0 - 17.0;
    let eta = midway.eta_s.unwrap();
    assert!(
        (eta - remaining).abs() <= 0.25 * remaining,
        "{eta} vs {remaining}"
    );
}

#[test]
fn alerts_are_not_repeated_until_worse() {
    let snapshots = leak(WatchConfig::default(), 30, 0);
    let fd_alerts: Vec<f64> = all_alerts(&snapshots)
        .iter()
        .filter(|alert| alert.kind == AlertKind::FdExhaustion)
        .map(|alert| alert.eta_s.unwrap())
        .collect();
    // Raised once, then only each time the ETA halved.
    assert!(
        !fd_alerts.is_empty() && fd_alerts.len() < 6,
        "{fd_alerts:?}"
    );
    for pair in fd_alerts.windows(2) {
        assert!(pair[1] <= pair[0] / 2.0, "{fd_alerts:?}");
    }
}

/// A fast leak as the collector sees it: `ruler` opens a connection every
/// 300 ms and keeps it, from 8 fds against a soft limit of 80 (reached at
/// about 22 s); the seconds scale is sampled at every 100-ms collector
/// tick, and a report made every second.
fn fast_leak(seconds: u64) -> Vec<Snapshot> {
    let mut watch = Watch::new(WatchConfig::default(), START);
    let mut snapshots = Vec::new();
    let mut opened = 0;
    for k in 1..=seconds * 10 {
        let at = START + k * 100 * MS;
        if k % 3 == 0 {
            connect(&mut watch, RULER, opened, at - 50 * MS, SERVER);
            opened += 1;
        }
        watch.sample_fast(at);
        if k % 10 == 0 {
            snapshots.push(tick(&mut watch, at, &[(4242, 8 + opened, 80)], 0));
        }
    }
    snapshots
}

/// Raised by the seconds scale within seconds, the fd alert must go on
/// following the forecast when the minute scale takes over (its growth is
/// not "steady" until it spans 20 s), not stand still on its first figures
/// until the fds are crowded.
#[test]
fn the_fd_alert_in_force_follows_the_forecast() {
    let snapshots = fast_leak(20);
    let mut followed = 0;
    for snapshot in &snapshots {
        let report = &snapshot.processes[0];
        let in_force = report
            .alerts
            .iter()
            .find(|alert| alert.kind == AlertKind::FdExhaustion);
        if let (Some(alert), Some(eta)) = (in_force, report.eta_s) {
            assert_eq!(alert.eta_s, Some(eta), "{}", alert.message);
            followed += 1;
        }
    }
    assert!(followed >= 10, "{followed} reports");
    // The ETA's halvings announced before the fds came near the limit.
    let worse_before_crowded = all_alerts(&snapshots)
        .iter()
        .filter(|alert| alert.kind == AlertKind::FdExhaustion)
        .filter(|alert| alert.state == AlertState::Worse)
        .filter(|alert| alert.fds.is_some_and(|fds| fds < 72))
        .count();
    assert!(worse_before_crowded >= 2, "{worse_before_crowded}");
}

#[test]
fn a_process_past_its_fd_limit_is_said_to_be_there() {
    // The limit (400) is reached at 35 s; the forecast has nothing left to say.
    let snapshots = leak(WatchConfig::default(), 40, 0);
    let last = &snapshots.last().expect("snapshots").processes[0];
    let fd = last
        .alerts
        .iter()
        .find(|alert| alert.kind == AlertKind::FdExhaustion)
        .expect("the fd alert in force");
    assert!(
        fd.message
            .contains("fds 450/400, over the soft limit: opening more fails (EMFILE)"),
        "{}",
        fd.message
    );
}

#[test]
fn socket_growth_is_flagged_when_opens_outpace_closes() {
    // Growth must last most of a minute; the rates cover the time since
    // start, not yet the whole five-minute window.
    let snapshots = leak(WatchConfig::default(), 60, 0);
    let growth = all_alerts(&snapshots)
        .into_iter()
        .find(|alert| alert.kind == AlertKind::SocketGrowth)
        .expect("growth alert");
    assert!(
        growth
            .message
            .contains("opens outpace closes, 10/s vs 0/s over 55s"),
        "{}",
        growth.message
    );
}

#[test]
fn lost_events_are_mentioned() {
    let snapshots = leak(WatchConfig::default(), 30, 3);
    let alert = all_alerts(&snapshots)[0];
    assert_eq!(alert.lost_events, 3);
    assert!(
        alert
            .message
            .ends_with(" (3 events lost; figures may be low)"),
        "{}",
        alert.message
    );
}

/// Connections per second at `rate`, each over after `hold`; `close` ends it.
fn churn(
    watch: &mut Watch,
    seconds: u64,
    rate: u64,
    mut close: impl FnMut(&mut Watch, u64, u64),
    fds: &[(u32, u64, u64)],
) -> Vec<Snapshot> {
    let mut snapshots = Vec::new();
    for second in 0..seconds {
        for i in 0..rate {
            let sock_id = second * rate + i;
            let at = START + second * S + i * (S / rate);
            close(watch, sock_id, at);
        }
        // Fds wobble with the connections in flight.
        let wobble = |fds: u64| fds + (second * 7919) % 13;
        let samples: Vec<(u32, u64, u64)> = fds
            .iter()
            .map(|&(pid, fds, limit)| (pid, wobble(fds), limit))
            .collect();
        snapshots.push(tick(watch, START + (second + 1) * S, &samples, 0));
    }
    snapshots
}

/// Two minutes of 500 connections per second by the ruler, each ended by
/// `close`: no alert may be raised. The ruler's last report.
fn quiet_churn(close: impl FnMut(&mut Watch, u64, u64)) -> ProcessReport {
    let mut watch = Watch::new(WatchConfig::default(), START);
    let snapshots = churn(&mut watch, 120, 500, close, &[(4242, 80, 1024)]);
    let alerts = all_alerts(&snapshots);
    assert!(alerts.is_empty(), "{alerts:#?}");
    report(snapshots.last().unwrap(), 4242).clone()
}

#[test]
fn churn_with_prompt_closes_is_quiet() {
    // The client closes after the server's FIN within a millisecond.
    let ruler = quiet_churn(|watch, sock_id, at| {
        connect(watch, RULER, sock_id, at, SERVER);
        let ends = (local_end(sock_id), SERVER.to_string());
        peer_fin(watch, sock_id, at + 2 * MS, (&ends.0, &ends.1));
        close_after_fin(watch, RULER, sock_id, at + 3 * MS, (&ends.0, &ends.1));
    });
    assert!((ruler.connects_per_s - 500.0).abs() < 5.0);
    assert!((ruler.closes_per_s - 500.0).abs() < 5.0);
    assert_eq!(ruler.held, 0);
    let dwell = ruler.close_wait_dwell_s.unwrap();
    assert_eq!(dwell.count, 60_000);
    assert!(dwell.max_s < 0.01);
}

#[test]
fn time_wait_churn_on_the_active_closer_is_quiet() {
    let ruler = quiet_churn(|watch, sock_id, at| {
        connect(watch, RULER, sock_id, at, SERVER);
        let local = local_end(sock_id);
        close_first(watch, RULER, sock_id, at + 5 * MS, (&local, SERVER));
    });
    assert_eq!(ruler.held, 0);
    assert_eq!(ruler.peers[0].local_closed_first, 60_000);
    assert_eq!(ruler.peers[0].peer_idle_timeout_s, None);
}

#[test]
fn idle_pool_is_quiet() {
    // 100 connections opened at once, then held idle for ten minutes.
    let mut watch = Watch::new(WatchConfig::default(), START);
    let mut snapshots = Vec::new();
    for second in 0..600 {
        if second == 20 {
            for sock_id in 0..100 {
                connect(
                    &mut watch,
                    RULER,
                    sock_id,
                    START + second * S + sock_id * MS,
                    SERVER,
                );
            }
        }
        let fds = if second >= 20 { 150 } else { 50 };
        snapshots.push(tick(
            &mut watch,
            START + (second + 1) * S,
            &[(4242, fds, 1024)],
            0,
        ));
    }
    let alerts = all_alerts(&snapshots);
    assert!(alerts.is_empty(), "{alerts:#?}");
    let ruler = report(snapshots.last().unwrap(), 4242);
    assert_eq!(ruler.held, 100);
    assert_eq!(ruler.sockets.get("ESTABLISHED"), Some(&100));
    assert_eq!(ruler.eta_s, None);
    // Connection reuse shows as long lifetimes.
    assert!(ruler.peers[0].lifetime_max_s.unwrap() > 500.0);
}

#[test]
fn pool_filling_over_seconds_is_quiet() {
    // A lazily filled pool: one more connection every 200 ms for 20 s, then
    // 100 held idle; fds follow.
    let mut watch = Watch::new(WatchConfig::default(), START);
    let mut snapshots = Vec::new();
    for second in 0..300u64 {
        for i in 0..5 {
            let sock_id = second * 5 + i;
            if sock_id < 100 {
                let at = START + second * S + i * 200 * MS;
                connect(&mut watch, RULER, sock_id, at, SERVER);
            }
        }
        let fds = 50 + ((second + 1) * 5).min(100);
        let now = START + (second + 1) * S;
        snapshots.push(tick(&mut watch, now, &[(4242, fds, 65_536)], 0));
    }
    let alerts = all_alerts(&snapshots);
    assert!(alerts.is_empty(), "{alerts:#?}");
    assert_eq!(report(snapshots.last().unwrap(), 4242).held, 100);
}

#[test]
fn listener_is_quiet_and_not_held() {
    let server = Actor {
        pid: Some(500),
        comm: "server",
    };
    let mut watch = Watch::new(WatchConfig::default(), START);
    watch.on_transition(&server.event(START, 1, ("0.0.0.0:8080", "0.0.0.0:0"), (Close, Listen)));
    let mut snapshots = Vec::new();
    for second in 1..200 {
        snapshots.push(tick(&mut watch, START + second * S, &[(500, 20, 1024)], 0));
    }
    let alerts = all_alerts(&snapshots);
    assert!(alerts.is_empty(), "{alerts:#?}");
    let report = report(snapshots.last().unwrap(), 500);
    assert_eq!(report.sockets.get("LISTEN"), Some(&1));
    assert_eq!(report.held, 0);
    assert_eq!(report.connects_per_s, 0.0);
    assert!(report.peers.is_empty());
}

/// A server that never closes the connections its clients leave.
#[test]
fn server_keeping_close_wait_is_flagged() {
    let server = Actor {
        pid: Some(500),
        comm: "server",
    };
    let config = WatchConfig {
        close_wait_age: Duration::from_secs(10),
        ..WatchConfig::default()
    };
    let mut watch = Watch::new(config, START);
    let listen = "127.0.0.1:8080";
    watch.on_transition(&server.event(START, 1, (listen, "0.0.0.0:0"), (Close, Listen)));
    let mut snapshots = Vec::new();
    for second in 0..40u64 {
        for i in 0..2 {
            let sock_id = 100 + second * 2 + i;
            let client = format!("10.0.0.9:{}", 40_000 + sock_id);
            let at = START + second * S + i * 300 * MS;
            let ends = (listen, client.as_str());
            // Before accept() only the softirq sees the child socket.
            watch.on_transition(&SOFTIRQ.event(at, sock_id, ends, (Listen, SynRecv)));
            watch.on_transition(&SOFTIRQ.event(at + MS, sock_id, ends, (SynRecv, Established)));
            // The owner is known from accept() on; the client leaves.
            watch.on_transition(&server.event(
                at + 50 * MS,
                sock_id,
                ends,
                (Established, CloseWait),
            ));
        }
        snapshots.push(tick(
            &mut watch,
            START + (second + 1) * S,
            &[(500, 30 + 2 * second, 65_535)],
            0,
        ));
    }
    let alert = all_alerts(&snapshots)
        .into_iter()
        .find(|alert| alert.kind == AlertKind::CloseWait)
        .expect("CLOSE_WAIT alert");
    assert_eq!(alert.pid, 500);
    assert_eq!(alert.remote.as_deref(), Some("10.0.0.9:*"));
    assert!(
        alert
            .message
            .contains("sockets from 10.0.0.9 on :8080 in CLOSE_WAIT, oldest "),
        "{}",
        alert.message
    );
    let report = report(snapshots.last().unwrap(), 500);
    assert_eq!(report.close_wait, 80);
    assert_eq!(report.connects_per_s_long * 40.0, 80.0);
    assert_eq!(report.peers[0].local_port, Some(8080));
}

#[test]
fn leak_from_before_start_is_in_the_first_snapshot() {
    let mut watch = Watch::new(WatchConfig::default(), START);
    let owner = Owner {
        pid: Some(77),
        nspid: None,
        comm: "legacy".into(),
        source: OwnerSource::ProcFd,
    };
    for sock_id in 0..40 {
        watch.on_seeded(&ExistingSocket {
            sock_id,
            owner,
            local: local_end(sock_id).parse().unwrap(),
            remote: SERVER.parse().unwrap(),
            state: CloseWait,
            cause: None,
            netns: 0,
        });
    }
    let first = tick(&mut watch, START + 100 * MS, &[(77, 60, 1024)], 0);
    let legacy = report(&first, 77);
    assert_eq!(legacy.close_wait, 40);
    assert!(legacy.close_wait_oldest_lower_bound);
    assert_eq!(legacy.peers[0].peer_closed_first, 40);
    let alert = &first.new_alerts[0];
    assert_eq!((alert.kind, alert.pid), (AlertKind::CloseWait, 77));
    assert!(
        alert.message.contains(
            "40 sockets to 10.0.0.5:17000 in CLOSE_WAIT, oldest ≥ 0s (already waiting when socktrace started)"
        ),
        "{}",
        alert.message
    );

    // Later transitions of seeded sockets are understood.
    let ends = (local_end(0), SERVER.to_string());
    let legacy_actor = Actor {
        pid: Some(77),
        comm: "legacy",
    };
    close_after_fin(&mut watch, legacy_actor, 0, START + S, (&ends.0, &ends.1));
    let next = tick(&mut watch, START + 2 * S, &[(77, 59, 1024)], 0);
    let legacy = report(&next, 77);
    assert_eq!(legacy.close_wait, 39);
    assert!((legacy.close_wait_oldest_s.unwrap() - 2.0).abs() < 1e-9);
    assert!((legacy.closes_per_s - 0.5).abs() < 1e-9);
}

#[test]
fn peer_idle_timeout_of_two_seconds_with_reuse() {
    // The client reuses its connection every 3 s, the server drops it after
    // 2 s idle, so each connection: connect, one request, 2 s idle, FIN; the
    // client notices on its next use and reconnects.
    let mut watch = Watch::new(WatchConfig::default(), START);
    for round in 0..10u64 {
        let at = START + round * 3 * S;
        connect(&mut watch, RULER, round, at, SERVER);
        let ends = (local_end(round), SERVER.to_string());
        peer_fin(&mut watch, round, at + 2 * S + 7 * MS, (&ends.0, &ends.1));
        close_after_fin(
            &mut watch,
            RULER,
            round,
            at + 3 * S - MS,
            (&ends.0, &ends.1),
        );
    }
    let snapshot = tick(&mut watch, START + 30 * S, &[], 0);
    let peer = &report(&snapshot, 4242).peers[0];
    assert!((peer.peer_idle_timeout_s.unwrap() - 2.0).abs() < 0.05);
    assert_eq!(peer.opened, 10);
    assert_eq!(peer.closed, 10);
    assert!((peer.lifetime_mean_s.unwrap() - 3.0).abs() < 0.01);
}

#[test]
fn peer_idle_timeout_of_ten_seconds_and_none_when_scattered() {
    let mut watch = Watch::new(WatchConfig::default(), START);
    let scattered = "10.0.0.6:443";
    let dwells_s = [1, 7, 15, 3, 30, 12];
    for (i, dwell) in dwells_s.iter().enumerate() {
        let i = i as u64;
        let at = START + i * 40 * S;
        for (sock_id, remote, dwell) in [(2 * i, SERVER, 10), (2 * i + 1, scattered, *dwell)] {
            connect(&mut watch, RULER, sock_id, at, remote);
            let local = local_end(sock_id);
            let fin = at + dwell * S + (sock_id % 3) * 50 * MS;
            peer_fin(&mut watch, sock_id, fin, (&local, remote));
            close_after_fin(&mut watch, RULER, sock_id, fin + MS, (&local, remote));
        }
    }
    let snapshot = tick(&mut watch, START + 300 * S, &[], 0);
    let ruler = report(&snapshot, 4242);
    let peer = |remote: &str| {
        ruler
            .peers
            .iter()
            .find(|peer| peer.remote == remote)
            .unwrap()
    };
    assert!((peer(SERVER).peer_idle_timeout_s.unwrap() - 10.0).abs() < 0.2);
    assert_eq!(peer(scattered).peer_idle_timeout_s, None);
}

#[test]
fn exited_process_is_reported_once_more_then_forgotten() {
    let mut watch = Watch::new(WatchConfig::default(), START);
    connect(&mut watch, RULER, 1, START, SERVER);
    assert_eq!(watch.pids_to_sample(), vec![4242]);
    watch.on_process_exit(4242, START + S);
    assert!(watch.pids_to_sample().is_empty());
    // The kernel closes its fds as it exits; not pinned on the pid.
    close_first(
        &mut watch,
        RULER,
        1,
        START + S + MS,
        (&local_end(1), SERVER),
    );
    let last = tick(&mut watch, START + 2 * S, &[], 0);
    assert!(report(&last, 4242).exited);
    let after = tick(&mut watch, START + 3 * S, &[], 0);
    assert!(after.processes.is_empty());
    assert!(watch.sockets.is_empty());
    // A connection it made before it exited, which the kernel held and
    // sent after its last report, does not bring it back.
    connect(&mut watch, RULER, 2, START + S - 10 * MS, SERVER);
    let later = tick(&mut watch, START + 4 * S, &[], 0);
    assert!(later.processes.is_empty(), "{:?}", later.processes);
}

#[test]
fn pid_filter_keeps_only_the_chosen() {
    let config = WatchConfig {
        pids: vec![4242],
        ..WatchConfig::default()
    };
    let mut watch = Watch::new(config, START);
    let other = Actor {
        pid: Some(9),
        comm: "other",
    };
    connect(&mut watch, other, 1, START, SERVER);
    connect(&mut watch, RULER, 2, START, SERVER);
    assert_eq!(watch.pids_to_sample(), vec![4242]);
    assert_eq!(watch.sockets.len(), 1);
    let snapshot = tick(&mut watch, START + S, &[(4242, 10, 100)], 0);
    assert_eq!(snapshot.processes.len(), 1);
}

#[test]
fn json_lines_have_the_documented_fields() {
    let config = WatchConfig {
        close_wait_age: Duration::from_secs(5),
        ..WatchConfig::default()
    };
    let snapshots = leak(config, 30, 0);
    let with_alert = snapshots
        .iter()
        .find(|snapshot| !snapshot.new_alerts.is_empty())
        .unwrap();
    let text = json_lines(with_alert, 1_716_200_000.123_4).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let process = &lines[0];
    assert_eq!(process["type"], "process");
    assert_eq!(process["ts"], 1_716_200_000.123);
    assert_eq!(process["pid"], 4242);
    assert_eq!(process["comm"], "ruler");
    for number in [
        "connects_per_s",
        "closes_per_s",
        "net_per_s",
        "close_wait",
        "fds",
    ] {
        assert!(process[number].is_number(), "{number}");
    }
    assert!(process["fd_soft_limit"].is_u64());
    assert!(process["eta_s"].is_f64());
    assert!(process["close_wait_oldest_s"].is_f64() || process["close_wait_oldest_s"].is_null());
    assert!(process["close_wait_oldest_lower_bound"].is_boolean());
    assert!(process["sockets"]["ESTABLISHED"].is_u64());
    assert!(process["alerts"][0].is_string());
    assert_eq!(process["lost_events"], 0);
    let peer = &process["peers"][0];
    assert_eq!(peer["remote"], SERVER);
    for number in [
        "opened",
        "closed",
        "held",
        "close_wait",
        "peer_closed_first",
    ] {
        assert!(peer[number].is_u64(), "{number}");
    }
    assert!(peer.get("peer_idle_timeout_s").is_some());

    let alert = lines.iter().find(|line| line["type"] == "alert").unwrap();
    assert!(alert["kind"].is_string());
    assert_eq!(alert["ts"], 1_716_200_000.123);
    assert_eq!(alert["pid"], 4242);
    assert_eq!(alert["comm"], "ruler");
    assert_eq!(alert["remote"], SERVER);
    assert!(alert["eta_s"].is_f64());
    assert!(
        alert["message"]
            .as_str()
            .unwrap()
            .starts_with("pid 4242 (ruler): ")
    );

    // Not growing: eta_s is present and null.
    let mut watch = Watch::new(WatchConfig::default(), START);
    connect(&mut watch, RULER, 1, START, SERVER);
    let flat = tick(&mut watch, START + S, &[(4242, 10, 100)], 0);
    let line: serde_json::Value =
        serde_json::from_str(json_lines(&flat, 0.0).unwrap().trim_end()).unwrap();
    assert!(line["eta_s"].is_null());
}

fn table_snapshot() -> Snapshot {
    // A healthy process with a low pid and the leaking one.
    let config = WatchConfig {
        close_wait_age: Duration::from_secs(5),
        ..WatchConfig::default()
    };
    let mut snapshots = leak(config, 30, 2);
    let mut snapshot = snapshots.pop().unwrap();
    let mut watch = Watch::new(WatchConfig::default(), START);
    let calm = Actor {
        pid: Some(12),
        comm: "calm",
    };
    connect(&mut watch, calm, 1, START, "10.0.0.8:5432");
    snapshot
        .processes
        .extend(tick(&mut watch, START + S, &[(12, 20, 1024)], 0).processes);
    snapshot.processes.sort_by(worst_first);
    snapshot
}

#[test]
fn table_lists_worst_first_and_highlights_alerts() {
    let snapshot = table_snapshot();
    let style = TableStyle {
        width: 160,
        max_rows: 10,
        color: false,
    };
    let text = table::table(&snapshot, &style);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "socktrace: 2 processes, 301 held, 280 in CLOSE_WAIT, 0 CLOSED_HELD, 1 alerting, 2 events lost"
    );
    assert!(
        lines[1].contains("PID") && lines[1].contains("TOP-PEER"),
        "{}",
        lines[1]
    );
    assert!(lines[2].starts_with("!    4242 ruler"), "{}", lines[2]);
    assert!(
        lines[2].contains("10.0.0.5:17000 (300) idle≈2.0 s"),
        "{}",
        lines[2]
    );
    assert!(lines[3].starts_with("       12 calm"), "{}", lines[3]);
    assert!(lines[4].starts_with("! pid 4242 (ruler): "), "{}", lines[4]);
    assert!(text.lines().all(|line| line.chars().count() <= 160));

    let colored = table::table(
        &snapshot,
        &TableStyle {
            color: true,
            ..style
        },
    );
    let ruler_row = colored.lines().nth(2).unwrap();
    assert!(ruler_row.starts_with("\x1b[1;31m!") && ruler_row.ends_with("\x1b[0m"));
    assert!(!colored.lines().nth(3).unwrap().contains('\x1b'));
}

#[test]
fn table_fits_narrow_terminals() {
    let snapshot = table_snapshot();
    for width in [40, 80, 100, 120] {
        let style = TableStyle {
            width,
            max_rows: 1,
            color: false,
        };
        let text = table::table(&snapshot, &style);
        assert!(
            text.lines().all(|line| line.chars().count() <= width),
            "{width}:\n{text}"
        );
        assert!(text.contains("… 1 more processes"));
    }
    // On 80 columns the peer, the rates and the limit give way; ETA stays.
    let narrow = table::table(
        &snapshot,
        &TableStyle {
            width: 80,
            max_rows: 5,
            color: false,
        },
    );
    let titles = narrow.lines().nth(1).unwrap();
    for kept in [
        "PID",
        "COMM",
        "CLOSE_WAIT",
        "CLOSED_HELD",
        "OLDEST",
        "FDS",
        "ETA",
    ] {
        assert!(titles.contains(kept), "{titles}");
    }
    for dropped in ["TOP-PEER", "NET/s", "CLOSE/s", "ESTAB", "CONN/s", "LIMIT"] {
        assert!(!titles.contains(dropped), "{titles}");
    }
    assert!(narrow.lines().nth(2).unwrap().ends_with("5s"), "{narrow}");
}

#[test]
fn distributions_and_totals_per_process() {
    let mut watch = Watch::new(WatchConfig::default(), START);
    // Two connections: one the peer closes (CLOSE_WAIT for 3 s, then the
    // owner closes), one the owner closes first after 5 s.
    for sock_id in [1, 2] {
        connect(&mut watch, RULER, sock_id, START, SERVER);
    }
    let first = (local_end(1), SERVER.to_string());
    let first = (first.0.as_str(), first.1.as_str());
    peer_fin(&mut watch, 1, START + S, first);
    close_after_fin(&mut watch, RULER, 1, START + 4 * S, first);
    let second = local_end(2);
    close_first(&mut watch, RULER, 2, START + 5 * S, (&second, SERVER));

    let snapshot = tick(&mut watch, START + 6 * S, &[(4242, 10, 100)], 0);
    let ruler = report(&snapshot, 4242);
    assert_eq!((ruler.connects_total, ruler.closes_total), (2, 2));
    let distributions = watch.distributions(4242).unwrap();
    // connect() puts the handshake 1 ms after SYN_SENT.
    let latency = distributions.connect_latency.histogram().unwrap();
    assert_eq!(latency.len(), 2);
    assert!(latency.max().abs_diff(1_000) <= 10, "{}", latency.max());
    let dwell = distributions.close_wait_dwell.histogram().unwrap();
    assert_eq!(dwell.len(), 1);
    assert!(dwell.max().abs_diff(3_000_000) < 30_000);
    assert_eq!(distributions.lifetime.count(), 2);

    // After its last report, an exited process's distributions stay
    // readable until the next tick.
    watch.on_process_exit(4242, START + 7 * S);
    let last = tick(&mut watch, START + 8 * S, &[], 0);
    assert!(report(&last, 4242).exited);
    assert_eq!(watch.distributions(4242).unwrap().lifetime.count(), 2);
    tick(&mut watch, START + 9 * S, &[], 0);
    assert!(watch.distributions(4242).is_none());
}

/// The network closes a socket: ESTABLISHED or CLOSE_WAIT -> CLOSED_HELD.
fn network_close(watch: &mut Watch, sock_id: u64, at: u64, old: TcpState, cause: CloseCause) {
    let ends = (local_end(sock_id), SERVER.to_string());
    let mut t = SOFTIRQ.event(at, sock_id, (&ends.0, &ends.1), (old, ClosedHeld));
    t.cause = Some(cause);
    watch.on_transition(&t);
}

/// The incident past its first minute: a leaked socket a second, the peer
/// closes each after 2 s (CLOSE_WAIT), and 10 s later a keep-alive probe
/// gets a reset (CLOSED_HELD). The process never closes any; when it exits
/// the kernel releases them.
fn incident(watch: &mut Watch, seconds: u64) -> Vec<Snapshot> {
    let mut snapshots = Vec::new();
    for second in 0..seconds {
        let at = START + second * S;
        connect(watch, RULER, second, at, SERVER);
        if second >= 2 {
            let fin = second - 2;
            peer_fin(watch, fin, at + 2 * MS, (&local_end(fin), SERVER));
        }
        if second >= 12 {
            network_close(
                watch,
                second - 12,
                at + 3 * MS,
                CloseWait,
                CloseCause::Reset,
            );
        }
        let fds = 20 + second + 1;
        snapshots.push(tick(watch, at + S - MS, &[(4242, fds, 65_535)], 0));
    }
    snapshots
}

#[test]
fn sockets_the_network_closed_stay_held_and_in_the_verdict() {
    let config = WatchConfig {
        close_wait_age: Duration::from_secs(5),
        ..WatchConfig::default()
    };
    let mut watch = Watch::new(config, START);
    let snapshots = incident(&mut watch, 90);
    let last = report(snapshots.last().unwrap(), 4242);
    // Every socket ever opened is still held: 78 reset, 10 in CLOSE_WAIT.
    assert_eq!(last.held, 90);
    assert_eq!((last.close_wait, last.closed_held), (10, 78));
    assert_eq!(last.sockets["CLOSED_HELD"], 78);
    assert_eq!(last.closed_held_causes["reset"], 78);
    assert_eq!(last.closes_total, 0, "the process closed nothing");
    let peer = &last.peers[0];
    assert_eq!((peer.held, peer.close_wait, peer.closed_held), (90, 10, 78));
    assert_eq!(peer.reset, 78);
    assert_eq!(peer.peer_closed_first, 88);

    // Raised once the pile kept growing and got old enough, and in force
    // at every report from then on.
    let raised = snapshots
        .iter()
        .position(|s| s.new_alerts.iter().any(|a| a.kind == AlertKind::CloseWait))
        .expect("a close_wait alert");
    assert!(raised < 30, "raised after {raised} s");
    for snapshot in &snapshots[raised..] {
        let kinds: Vec<AlertKind> = snapshot.processes[0]
            .alerts
            .iter()
            .map(|a| a.kind)
            .collect();
        assert!(kinds.contains(&AlertKind::CloseWait), "{kinds:?}");
    }
    let alert = last
        .alerts
        .iter()
        .find(|a| a.kind == AlertKind::CloseWait)
        .unwrap();
    assert!(
        alert.message.contains(&format!(
            "88 sockets held to {SERVER} after the connection ended: 10 in CLOSE_WAIT, 78 closed by the peer's reset but never closed by the process"
        )),
        "{}",
        alert.message
    );

    // It exits: the kernel closes the fds, the alerts resolve.
    watch.on_process_exit(4242, START + 91 * S);
    for sock_id in 0..90 {
        let ends = (local_end(sock_id), SERVER.to_string());
        let old = if sock_id < 78 { ClosedHeld } else { CloseWait };
        let new = if old == ClosedHeld { Close } else { LastAck };
        watch.on_transition(&RULER.event(
            START + 91 * S + MS,
            sock_id,
            (&ends.0, &ends.1),
            (old, new),
        ));
    }
    let after = tick(&mut watch, START + 92 * S, &[], 0);
    let resolved: Vec<&Alert> = after.new_alerts.iter().collect();
    assert!(!resolved.is_empty());
    assert!(
        resolved.iter().all(|a| a.state == AlertState::Resolved),
        "{resolved:#?}"
    );
    assert!(
        resolved
            .iter()
            .all(|a| a.message.ends_with("resolved: the process exited"))
    );
}

/// A leak that hit the fd limit stops growing: `ruler` keeps `opened`
/// connections that the server hung up on a second after each was opened
/// (3 a second), then opens no more. Reports every second to `seconds`.
fn leak_that_stopped(opened: u64, seconds: u64) -> Vec<Snapshot> {
    let mut watch = Watch::new(WatchConfig::default(), START);
    let mut snapshots = Vec::new();
    for second in 1..=seconds {
        // Opened in this second, and hung up on: opened in the one before.
        for sock_id in (second - 1) * 3..second * 3 {
            if sock_id < opened {
                connect(&mut watch, RULER, sock_id, START + sock_id * S / 3, SERVER);
            }
            if let Some(old) = sock_id.checked_sub(3).filter(|&old| old < opened) {
                let local = local_end(old);
                peer_fin(&mut watch, old, START + old * S / 3 + S, (&local, SERVER));
            }
        }
        let fds = 8 + opened.min(second * 3);
        snapshots.push(tick(
            &mut watch,
            START + second * S + S / 2,
            &[(4242, fds, 80)],
            0,
        ));
    }
    snapshots
}

/// A pile that no longer grows once its oldest is `--close-wait-age` old
/// (60 s) is still a leak to name when it is large; a small one is not.
#[test]
fn a_pile_that_stopped_growing_is_named_once_old() {
    let snapshots = leak_that_stopped(72, 90);
    let raised: Vec<u64> = all_alerts(&snapshots)
        .iter()
        .filter(|alert| alert.kind == AlertKind::CloseWait)
        .map(|alert| alert.close_wait)
        .collect();
    assert_eq!(raised, [72]);
    let first_in_force = snapshots
        .iter()
        .position(|snapshot| {
            snapshot.processes[0]
                .alerts
                .iter()
                .any(|alert| alert.kind == AlertKind::CloseWait)
        })
        .map(|index| index + 1);
    // The oldest entered CLOSE_WAIT at 1 s; reports at 1.5, 2.5, ... s.
    assert_eq!(first_in_force, Some(61));

    let small = leak_that_stopped(verdicts::STRANDED_PILE - 1, 90);
    assert!(
        all_alerts(&small)
            .iter()
            .all(|alert| alert.kind != AlertKind::CloseWait)
    );
}
