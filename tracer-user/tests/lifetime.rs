//! Root integration tests of a socket's two lifetimes: TCP may reach CLOSE
//! (a reset, a timeout, a refused connect) long before the owner lets go of
//! the fd. socktrace follows the socket until its last holder releases it:
//! CLOSED_HELD in every output, with the cause, and the release as its own
//! event. Real sockets, the real kernel programs; each test filters by its
//! own pids and ports.

// A broken expectation panics: that is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{process::Command, thread, time::Duration};

use common::{
    NetNs, Role, Tracer, Watch, go_workload, is_process_of, last_report, lines_of, loopback,
    loss_count, number, peer, port_of, require_root,
};
use serde_json::Value;

const ROLES: &str = "closed_roles.py";

/// Trace lines of the socket whose local port is `port`.
fn of_local_port(events: &[Value], port: u64) -> Vec<&Value> {
    events
        .iter()
        .filter(|e| port_of(&e["local"]) == port)
        .collect()
}

fn change<'a>(events: &[&'a Value], old: &str, new: &str) -> Option<&'a Value> {
    events
        .iter()
        .find(|e| e["old"] == old && e["new"] == new)
        .copied()
}

fn find_change<'a>(events: &[&'a Value], old: &str, new: &str) -> &'a Value {
    change(events, old, new).unwrap_or_else(|| panic!("no {old} -> {new} in {events:#?}"))
}

/// The `old -> new` change made in softirq (a reset, a timeout), or None
/// when it is missing and socktrace counted runs the kernel skipped. Classic
/// tracepoint programs share one guard per CPU with every other such
/// program, a parallel test's tracer too, so the fallback may lose that one
/// change; the loss must then be counted, never silent.
fn softirq_change<'a>(
    events: &[&'a Value],
    old: &str,
    new: &str,
    stderr: &[String],
) -> Option<&'a Value> {
    let found = change(events, old, new);
    if found.is_some() {
        return found;
    }
    let skipped = loss_count(stderr, "probe runs skipped");
    assert!(
        skipped > 0,
        "no {old} -> {new}, and no skipped run counted, in {events:#?}"
    );
    println!("no {old} -> {new}, with {skipped} probe runs skipped and counted: not asserted");
    None
}

/// The peer resets the connection (SO_LINGER 0); the client keeps its fd
/// for three seconds, then closes it. `trace` shows both ends of the
/// socket's second life: ESTABLISHED -> CLOSED_HELD (reset) and, three
/// seconds later, the client's release.
#[test]
fn trace_shows_a_reset_socket_held_then_released() {
    if !require_root("trace_shows_a_reset_socket_held_then_released") {
        return;
    }
    let tracer = Tracer::start(&["trace", "--json"]);
    let mut client = Role::spawn(ROLES, &["reset"]);
    let reset = client.expect("reset");
    let local_port = reset["local_port"].as_u64().expect("a port");
    thread::sleep(Duration::from_secs(3));
    client.send("close");
    client.expect("closed");
    thread::sleep(Duration::from_millis(300));
    let finished = tracer.stop();
    let events = finished.json();
    let socket = of_local_port(&events, local_port);
    let pid = u64::from(client.pid());

    let Some(closed) = softirq_change(&socket, "ESTABLISHED", "CLOSED_HELD", &finished.stderr)
    else {
        return;
    };
    assert_eq!(closed["pid"], pid, "{closed:#}");
    assert_eq!(closed["cause"], "reset", "{closed:#}");
    let released = find_change(&socket, "CLOSED_HELD", "CLOSE");
    assert_eq!(released["pid"], pid, "{released:#}");
    assert_eq!(released["owner_source"], "close", "{released:#}");
    assert_eq!(released["sock"], closed["sock"], "one socket");
    let held_s = number(&released["dwell_ns"]) / 1e9;
    assert!(
        (2.8..6.0).contains(&held_s),
        "held {held_s} s: {released:#}"
    );
    assert!(
        !socket
            .iter()
            .any(|e| e["old"] == "ESTABLISHED" && e["new"] == "CLOSE"),
        "the client's socket did not simply end: {socket:#?}"
    );
}

/// The same socket in `watch`: held by the client (not released) while it
/// keeps the fd, counted by cause for the peer, and released after.
#[test]
fn watch_counts_a_reset_socket_as_held_until_released() {
    if !require_root("watch_counts_a_reset_socket_as_held_until_released") {
        return;
    }
    let mut client = Role::spawn(ROLES, &["reset", "--on-command"]);
    let pid = client.pid();
    let mut watch = Watch::start(&["-p", &pid.to_string()]);
    // Reset once socktrace runs: the probes see it happen.
    client.send("reset");
    let reset = client.expect("reset");
    let server = loopback(u16::try_from(reset["server_port"].as_u64().unwrap_or(0)).unwrap_or(0));
    // The process reset its own server end (one close); the client's end
    // it has not closed. The reset's events come in the middle of that
    // close(), so a report may fall between them: wait for both.
    let held = watch.wait_for("the CLOSED_HELD socket", Duration::from_secs(10), |line| {
        is_process_of(line, pid) && line["closed_held"] == 1 && line["closes_total"] == 1
    });
    assert_eq!(held["held"], 1, "{held:#}");
    assert_eq!(held["sockets"]["CLOSED_HELD"], 1, "{held:#}");
    assert_eq!(held["closed_held_causes"]["reset"], 1, "{held:#}");
    let to_server = peer(&held, &server);
    assert_eq!(to_server["closed_held"], 1, "{to_server:#}");
    assert_eq!(to_server["reset"], 1, "{to_server:#}");
    assert_eq!(to_server["network_closed_first"], 1, "{to_server:#}");
    client.send("close");
    let released = watch.wait_for("the release", Duration::from_secs(10), |line| {
        is_process_of(line, pid) && line["closes_total"] == 2
    });
    assert_eq!(released["held"], 0, "{released:#}");
    assert_eq!(released["closed_held"], 0, "{released:#}");
    watch.stop();
}

/// A socket made and not yet connected is in CLOSE too, held by its file,
/// but it is no connection: not held at start, and no close when it then
/// listens.
#[test]
fn an_unconnected_socket_at_start_is_no_connection() {
    if !require_root("an_unconnected_socket_at_start_is_no_connection") {
        return;
    }
    let mut role = Role::spawn(ROLES, &["unconnected"]);
    role.expect("made");
    let pid = role.pid();
    let mut watch = Watch::start(&["-p", &pid.to_string()]);
    let first = watch.wait_for("the first report", Duration::from_secs(10), |line| {
        is_process_of(line, pid)
    });
    assert_eq!(first["held"], 0, "{first:#}");
    assert_eq!(first["closed_held"], 0, "{first:#}");
    role.send("listen");
    role.expect("listening");
    let listening = watch.wait_for("the listener", Duration::from_secs(10), |line| {
        is_process_of(line, pid) && line["sockets"]["LISTEN"] == 1
    });
    assert_eq!(listening["closes_total"], 0, "{listening:#}");
    assert_eq!(listening["held"], 0, "{listening:#}");
    watch.stop();
}

/// Sockets that reached CLOSE before socktrace started are found in the
/// processes' file tables (no sock_diag table lists them), with their owner
/// and cause, in the first report.
#[test]
fn closed_held_sockets_that_predate_socktrace_are_found() {
    if !require_root("closed_held_sockets_that_predate_socktrace_are_found") {
        return;
    }
    let holder = Role::spawn(ROLES, &["reset-many", "40"]);
    assert_eq!(holder.expect("reset")["reset"], 40);
    let pid = holder.pid().to_string();

    let finished = Tracer::start(&["watch", "--json", "--once", "-p", &pid]).wait();
    assert_eq!(finished.code, Some(0), "stderr: {:?}", finished.stderr);
    let lines = finished.json();
    let report = last_report(&lines, holder.pid());
    assert_eq!(report["closed_held"], 40, "{report:#}");
    assert_eq!(report["held"], 40, "{report:#}");
    assert_eq!(report["closed_held_causes"]["reset"], 40, "{report:#}");
    // A pile found at start is flagged at once, and named for what it is.
    let alert = lines_of(&lines, "alert", holder.pid())
        .into_iter()
        .find(|alert| alert["kind"] == "close_wait")
        .unwrap_or_else(|| panic!("no alert: {lines:#?}"));
    let message = alert["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("40 closed by the peer's reset but never closed by the process"),
        "{message}"
    );

    let traced = Tracer::start(&["trace", "--json", "-p", &pid])
        .stop()
        .json();
    let existing: Vec<&Value> = traced
        .iter()
        .filter(|e| e["existing"] == true && e["new"] == "CLOSED_HELD")
        .collect();
    assert_eq!(existing.len(), 40, "{traced:#?}");
    assert!(
        existing
            .iter()
            .all(|e| e["pid"] == holder.pid() && e["cause"] == "reset")
    );
}

/// A connect() refused by the peer whose fd the process keeps: held, cause
/// refused.
#[test]
fn a_refused_connect_kept_open_is_held() {
    if !require_root("a_refused_connect_kept_open_is_held") {
        return;
    }
    let tracer = Tracer::start(&["trace", "--json"]);
    let client = Role::spawn(ROLES, &["refused"]);
    let port = client.expect("refused")["port"].as_u64().expect("a port");
    thread::sleep(Duration::from_millis(300));
    let finished = tracer.stop();
    let events = finished.json();
    let refused: Vec<&Value> = events
        .iter()
        .filter(|e| port_of(&e["remote"]) == port)
        .collect();
    let Some(closed) = softirq_change(&refused, "SYN_SENT", "CLOSED_HELD", &finished.stderr) else {
        return;
    };
    assert_eq!(closed["pid"], client.pid(), "{closed:#}");
    assert_eq!(closed["cause"], "refused", "{closed:#}");
}

/// A connect() that times out (its SYNs dropped by a listener whose accept
/// queue is full, in a namespace of the test's own with one SYN retry) and
/// whose fd the process keeps: held, cause timed_out.
#[test]
fn a_timed_out_connect_kept_open_is_held() {
    if !require_root("a_timed_out_connect_kept_open_is_held") {
        return;
    }
    let netns = NetNs::new("timeout", &["net.ipv4.tcp_syn_retries=1"]);
    let tracer = Tracer::start(&["trace", "--json"]);
    let mut python = netns.command(&["python3"]);
    python.arg(common::workload(ROLES)).arg("timed-out");
    let client = Role::spawn_command(python);
    let port = client.expect("connecting")["port"]
        .as_u64()
        .expect("a port");
    let done = client.expect_within("timed_out", Duration::from_secs(30));
    assert_eq!(done["timed_out"], true, "{done}");
    thread::sleep(Duration::from_millis(300));
    let finished = tracer.stop();
    let events = finished.json();
    let mine: Vec<&Value> = events
        .iter()
        .filter(|e| e["pid"] == client.pid() && port_of(&e["remote"]) == port)
        .collect();
    if let Some(closed) = softirq_change(&mine, "SYN_SENT", "CLOSED_HELD", &finished.stderr) {
        assert_eq!(closed["cause"], "timed_out", "{closed:#}");
    }
}

/// A reset socket held through a dup and by a forked child: it ends with
/// its last holder. When the parent closes its fds first, nothing ends;
/// the child's close releases it.
#[test]
fn a_shared_socket_ends_with_its_last_holder() {
    if !require_root("a_shared_socket_ends_with_its_last_holder") {
        return;
    }
    for parent_exits in ["0", "1"] {
        let tracer = Tracer::start(&["trace", "--json"]);
        let mut parent = Role::spawn(ROLES, &["fork-holder", parent_exits]);
        let forked = parent.expect("forked");
        let child = forked["forked"].as_u64().expect("a pid");
        let local_port = forked["local_port"].as_u64().expect("a port");
        parent.send("parent");
        parent.expect("parent_closed");
        thread::sleep(Duration::from_millis(700));
        if parent_exits == "0" {
            parent.send("child");
        }
        parent.expect_within("child_closed", Duration::from_secs(10));
        thread::sleep(Duration::from_millis(300));
        let events = tracer.stop().json();
        let socket = of_local_port(&events, local_port);
        let releases: Vec<&&Value> = socket
            .iter()
            .filter(|e| e["old"] == "CLOSED_HELD" && e["new"] == "CLOSE")
            .collect();
        assert_eq!(
            releases.len(),
            1,
            "one release (parent exits: {parent_exits}): {socket:#?}"
        );
        assert_eq!(
            releases[0]["pid"], child,
            "the child let go last: {socket:#?}"
        );
    }
}

/// A process whose fds rise with pipes while its one TCP connection stays
/// healthy: socktrace blames no TCP peer and names the fd kind that grows.
#[test]
fn a_rise_of_pipes_names_pipes_not_a_tcp_peer() {
    if !require_root("a_rise_of_pipes_names_pipes_not_a_tcp_peer") {
        return;
    }
    let leaker = Role::spawn(ROLES, &["pipe-leak", "10", "600"]);
    leaker.expect("started");
    let pid = leaker.pid();
    let mut watch = Watch::start(&["-p", &pid.to_string()]);
    let alert = watch.wait_for(
        "an fd alert naming pipes",
        Duration::from_secs(60),
        |line| {
            line["type"] == "alert"
                && line["pid"] == pid
                && line["kind"] == "fd_exhaustion"
                && line["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("the rise is pipe"))
        },
    );
    let lines = watch.stop();
    assert!(alert["remote"].is_null(), "no TCP peer blamed: {alert:#}");
    let message = alert["message"].as_str().unwrap_or_default();
    assert!(message.contains("not TCP sockets"), "{message}");
    let report = last_report(&lines, pid);
    assert!(number(&report["fd_kinds"]["pipe"]) > 50.0, "{report:#}");
    // Its listener and both ends of the healthy connection.
    assert_eq!(report["fd_kinds"]["tcp"], 3, "{report:#}");
    assert!(
        report["held"].as_u64().is_some_and(|held| held <= 2),
        "{report:#}"
    );
}

/// The incident, time compressed in a namespace of the test's own: a Go
/// heartbeat that never closes its response bodies, a server that drops
/// idle connections after 1 s, the server's orphaned FIN_WAIT2 sockets
/// expiring after 2 s (`tcp_fin_timeout`, 60 s by default), and the
/// client's keep-alive probes (every 2 s) answered by resets. The leaked
/// sockets go CLOSE_WAIT -> CLOSED_HELD while the client keeps their fds;
/// `watch` keeps `held` with the fds, keeps the alert in force until the
/// client stops, and resolves it when the client exits.
#[test]
fn the_incident_with_keepalive_resets_stays_in_view() {
    if !require_root("the_incident_with_keepalive_resets_stays_in_view") {
        return;
    }
    let incident = go_workload("incident");
    let incident = incident.to_str().expect("a UTF-8 path");
    let netns = NetNs::new("incident", &["net.ipv4.tcp_fin_timeout=2"]);
    let mut server = Role::spawn_command(netns.command(&[incident, "server", "-idle", "1s"]));
    let port = server.expect("port")["port"].as_u64().expect("a port");
    let port = u16::try_from(port).expect("a port");
    let mut watch = Watch::port(port, &["--close-wait-age", "5s"]);
    let url = format!("http://127.0.0.1:{port}/");
    let mut client = Role::spawn_command(netns.command(&[
        incident,
        "client",
        "-url",
        &url,
        "-period",
        "0.5s",
        "-keepalive",
        "2s",
    ]));
    let start_fds = client.expect("started")["fds"]
        .as_u64()
        .expect("an fd count");
    let client_pid = client.pid();
    // Let the leak run across the timers: FIN after 1 s, orphans expire at
    // 3 s, resets from 5 s on.
    watch.wait_for(
        "40 leaked sockets closed by resets",
        Duration::from_secs(60),
        |line| is_process_of(line, client_pid) && number(&line["closed_held"]) >= 40.0,
    );
    thread::sleep(Duration::from_secs(5));
    let exit = watch.mark();
    client.finish();
    // The CLOSE_WAIT alert's own resolution: another of the pid's alerts
    // (fd exhaustion, socket growth) may resolve a report earlier.
    watch.wait_since(
        exit,
        "the CLOSE_WAIT alert resolved",
        Duration::from_secs(15),
        |line| {
            line["type"] == "alert"
                && line["pid"] == client_pid
                && line["kind"] == "close_wait"
                && line["state"] == "resolved"
        },
    );
    server.finish();
    let lines = watch.stop();

    let reports: Vec<&Value> = lines_of(&lines, "process", client_pid)
        .into_iter()
        .filter(|report| report["exited"] == false)
        .collect();
    let raised_at = lines_of(&lines, "alert", client_pid)
        .first()
        .map(|alert| number(&alert["ts"]))
        .unwrap_or_else(|| panic!("no alert: {lines:#?}"));
    let mut compared = 0;
    for report in &reports {
        let (held, fds) = (number(&report["held"]), report["fds"].as_f64());
        if let Some(fds) = fds.filter(|_| held >= 10.0) {
            let growth = fds - start_fds as f64;
            assert!(
                (held - growth).abs() <= (0.02 * growth).max(1.0),
                "held {held} but fds grew by {growth}: {report:#}"
            );
            compared += 1;
        }
        if number(&report["ts"]) >= raised_at {
            assert_ne!(
                report["alerts"],
                serde_json::json!([]),
                "in force: {report:#}"
            );
        }
    }
    assert!(compared >= 10, "{reports:#?}");
    let last = reports.last().expect("reports");
    let reset = number(&last["closed_held_causes"]["reset"]);
    assert!(reset >= 40.0, "{last:#}");
    let to_server = peer(last, &loopback(port));
    assert_eq!(to_server["held"], last["held"], "{to_server:#}");
    assert!(number(&to_server["reset"]) >= 40.0, "{to_server:#}");
    // The last word: the split between CLOSE_WAIT and the resets.
    let alert = lines_of(&lines, "alert", client_pid)
        .into_iter()
        .rev()
        .find(|alert| alert["kind"] == "close_wait")
        .expect("a close_wait alert");
    let message = alert["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!(
            "held to 127.0.0.1:{port} after the connection ended"
        )),
        "{message}"
    );
    assert!(
        message.contains("closed by the peer's reset but never closed by the process"),
        "{message}"
    );
    assert_eq!(alert["state"], "resolved", "{alert:#}");
    assert!(
        message.ends_with("resolved: the process exited"),
        "{message}"
    );
    drop(netns);
    let _ = Command::new("true").status();
}
