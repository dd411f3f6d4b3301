//! Root acceptance tests of `socktrace watch` (issue 4): real HTTP and TCP
//! servers and clients in separate processes, and the JSON Lines a user
//! reads. Each test asserts on its own pids and endpoints, so the tests can
//! run side by side with other root tests.

// A broken expectation panics: that is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{thread, time::Duration};

use common::{
    Role, Tracer, Watch, assert_quiet, find_peer, is_process_of, last_report, lines_of, loopback,
    loss_count, number, peer, require_root,
};
use serde_json::Value;

const ROLES: &str = "watch_roles.py";
/// Soft RLIMIT_NOFILE of the leaking client: at 10 requests a second it runs
/// out of file descriptors after about 35 s.
const CLIENT_NOFILE: &str = "360";

/// Each condition is raised once, and again only when it got worse: never
/// twice in a row with figures that are no worse.
fn assert_raised_again_only_when_worse(alerts: &[&Value]) {
    let alerts: Vec<&Value> = alerts
        .iter()
        .copied()
        .filter(|alert| alert["state"] != "resolved")
        .collect();
    let headroom = |alert: &Value| number(&alert["fd_soft_limit"]) - number(&alert["fds"]);
    for (i, later) in alerts.iter().enumerate() {
        let Some(earlier) = alerts[..i]
            .iter()
            .rev()
            .find(|a| a["kind"] == later["kind"])
        else {
            continue;
        };
        let worse = match later["kind"].as_str() {
            Some("fd_exhaustion") => {
                let eta_fell = match (later["eta_s"].as_f64(), earlier["eta_s"].as_f64()) {
                    (Some(now), Some(then)) => now < then,
                    _ => false,
                };
                eta_fell || headroom(later) < headroom(earlier)
            }
            Some("close_wait") => number(&later["close_wait"]) > number(&earlier["close_wait"]),
            _ => number(&later["held"]) > number(&earlier["held"]),
        };
        assert!(worse, "raised again, no worse: {earlier:#} then {later:#}");
    }
}

/// A workload that reports its listening port first.
fn server(args: &[&str]) -> (Role, u16) {
    let role = Role::spawn(ROLES, args);
    let port = role.expect("port")["port"].as_u64().expect("a port number");
    (role, u16::try_from(port).expect("a port number"))
}

fn http_server(idle_timeout_s: &str) -> (Role, u16) {
    server(&["http-server", idle_timeout_s])
}

/// `watch_roles.py http-client PORT MODE PERIOD_S REQUESTS [options]`.
fn http_client(port: u16, mode: &str, period_s: &str, requests: &str, options: &[&str]) -> Role {
    let port = port.to_string();
    let mut args = vec!["http-client", port.as_str(), mode, period_s, requests];
    args.extend(options);
    Role::spawn(ROLES, &args)
}

/// 1. The story: an HTTP server hangs up on idle keep-alive connections
///    after 1 s, and a client that never closes its responses keeps each
///    socket in CLOSE_WAIT until it hits EMFILE. socktrace names the client
///    and the server's endpoint within the first half of the client's life,
///    and its forecast midway is within 25% of the time that actually
///    remained.
#[test]
fn leaking_http_client_is_flagged_long_before_emfile() {
    if !require_root("leaking_http_client_is_flagged_long_before_emfile") {
        return;
    }
    let (server, port) = http_server("1");
    let mut watch = Watch::port(port, &[]);
    let client = http_client(port, "leak", "0.1", "1000", &["--nofile", CLIENT_NOFILE]);
    let started = number(&client.expect("started")["started"]);
    let failure = client.expect_within("emfile", Duration::from_secs(90));
    let emfile_at = number(&failure["emfile"]);
    let leaked = failure["requests"].as_u64().expect("request count");
    // Every connection the client made is held, and once the server has
    // timed them out all of them are in CLOSE_WAIT.
    let client_pid = client.pid();
    watch.wait_for(
        "every leaked socket in CLOSE_WAIT",
        Duration::from_secs(15),
        |line| is_process_of(line, client_pid) && line["close_wait"] == leaked,
    );
    let lines = watch.stop();
    let server_endpoint = loopback(port);

    // The alert names the client and the server's endpoint, early.
    let alerts = lines_of(&lines, "alert", client_pid);
    let first = alerts.first().expect("no alert for the leaking client");
    assert_eq!(first["kind"], "fd_exhaustion", "{first:#}");
    assert_eq!(first["remote"], server_endpoint.as_str(), "{first:#}");
    let message = first["message"].as_str().unwrap_or_default();
    assert!(message.contains(&server_endpoint), "{message}");
    let life = emfile_at - started;
    let alerted_after = number(&first["ts"]) - started;
    assert!(
        alerted_after <= life / 2.0,
        "alert {alerted_after:.1}s into a {life:.1}s run: {first:#}"
    );

    // Midway, the forecast matches the time that actually remained.
    let midpoint = started + life / 2.0;
    let midway = lines_of(&lines, "process", client_pid)
        .into_iter()
        .filter(|report| !report["eta_s"].is_null())
        .min_by(|a, b| {
            let off = |report: &Value| (number(&report["ts"]) - midpoint).abs();
            off(a).total_cmp(&off(b))
        })
        .expect("no forecast for the leaking client");
    let remained = emfile_at - number(&midway["ts"]);
    let eta = number(&midway["eta_s"]);
    println!(
        "alert {alerted_after:.1}s into {life:.1}s; midway eta {eta:.1}s, {remained:.1}s remained"
    );
    assert!(
        (eta - remained).abs() <= 0.25 * remained,
        "eta_s {eta:.1} but {remained:.1}s remained: {midway:#}"
    );

    // The sockets are the client's, to the server, which closed first.
    let last = last_report(&lines, client_pid);
    assert_eq!(last["held"], leaked, "{last:#}");
    let to_server = peer(last, &server_endpoint);
    assert_eq!(to_server["close_wait"], leaked, "{to_server:#}");
    assert_eq!(to_server["peer_closed_first"], leaked, "{to_server:#}");
    assert_eq!(to_server["local_closed_first"], 0, "{to_server:#}");
    assert_raised_again_only_when_worse(&alerts);
    // The server closes first and lets go: the healthy active closer.
    assert_quiet(&lines, server.pid(), "HTTP server");
}

/// 2. The same client, closing its responses and reusing one keep-alive
///    connection (closed at the end): no alert, and the reuse shows (one
///    connection that lived as long as the run).
#[test]
fn http_client_reusing_one_connection_is_healthy() {
    if !require_root("http_client_reusing_one_connection_is_healthy") {
        return;
    }
    let (server, port) = http_server("1");
    let mut watch = Watch::port(port, &[]);
    let client = http_client(port, "reuse", "0.1", "120", &["--nofile", CLIENT_NOFILE]);
    let done = client.expect_within("done", Duration::from_secs(60));
    let (client_pid, server_endpoint) = (client.pid(), loopback(port));
    watch.wait_for("the client's last close", Duration::from_secs(10), |line| {
        is_process_of(line, client_pid)
            && find_peer(line, &server_endpoint)
                .is_some_and(|peer| peer["closed"] == done["connections"])
    });
    let lines = watch.stop();

    assert_quiet(&lines, client.pid(), "reusing client");
    assert_quiet(&lines, server.pid(), "HTTP server");
    let last = last_report(&lines, client.pid());
    assert!(last["eta_s"].is_null(), "fds are not rising: {last:#}");
    let to_server = peer(last, &server_endpoint);
    assert_eq!(to_server["opened"], done["connections"], "{to_server:#}");
    assert!(number(&to_server["opened"]) <= 2.0, "{to_server:#}");
    assert_eq!(to_server["closed"], to_server["opened"], "{to_server:#}");
    assert_eq!(last["held"], 0, "{last:#}");
    // 120 requests 100 ms apart over the same connection.
    let lifetime = number(&to_server["lifetime_max_s"]);
    assert!(lifetime >= 10.0, "lifetime_max_s {lifetime}: {to_server:#}");
}

/// A server that never closes the connections its clients closed: its
/// accepted sockets pile up in CLOSE_WAIT, and the server's pid is flagged
/// with every one of them. The client, which closed first, is not. With
/// `accept_late`, the server takes its first connections from the backlog
/// only seconds after the handshake.
fn server_that_never_closes(accept_late: bool) {
    let mut args = vec!["hoard-server"];
    if accept_late {
        args.push("--accept-on-command");
    }
    let (mut hoarder, port) = server(&args);
    let mut watch = Watch::port(port, &["--close-wait-age", "2s"]);
    let connections = 150;
    let (port_arg, count_arg) = (port.to_string(), connections.to_string());
    let client = Role::spawn(ROLES, &["connect-close", &port_arg, "0.1", &count_arg]);
    if accept_late {
        thread::sleep(Duration::from_secs(3));
        hoarder.send("accept");
    }
    let hoarder_pid = hoarder.pid();
    // (Its fds rise too, so an fd_exhaustion alert may come as well.) From
    // the start: it may come while the server waits to accept.
    let alert = watch.wait_since(0, "a CLOSE_WAIT alert", Duration::from_secs(40), |line| {
        line["type"] == "alert" && line["pid"] == hoarder_pid && line["kind"] == "close_wait"
    });
    client.expect("done");
    watch.wait_for(
        "every accepted socket in CLOSE_WAIT",
        Duration::from_secs(10),
        |line| is_process_of(line, hoarder_pid) && line["close_wait"] == connections,
    );
    let lines = watch.stop();

    // Inbound clients are keyed by address and the listening port.
    assert_eq!(alert["remote"], "127.0.0.1:*", "{alert:#}");
    let message = alert["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("from 127.0.0.1 on :{port} in CLOSE_WAIT")),
        "{message}"
    );
    assert!(number(&alert["close_wait"]) >= 10.0, "{alert:#}");
    let last = last_report(&lines, hoarder_pid);
    assert_eq!(last["sockets"]["CLOSE_WAIT"], connections, "{last:#}");
    assert!(number(&last["close_wait_oldest_s"]) >= 2.0, "{last:#}");
    let clients = peer(last, "127.0.0.1:*");
    assert_eq!(clients["local_port"], port, "{clients:#}");
    assert_eq!(clients["peer_closed_first"], connections, "{last:#}");
    assert_quiet(&lines, client.pid(), "client that closes first");
}

/// 3. A server that never closes accepted connections after its clients
///    leave is flagged with its CLOSE_WAIT sockets.
#[test]
fn server_that_never_closes_is_flagged() {
    if require_root("server_that_never_closes_is_flagged") {
        server_that_never_closes(false);
    }
}

/// 3b. The same server, busy: it accepts its first connections seconds
///     after their handshake (and after the clients' FIN). They are its
///     sockets all the same.
#[test]
fn server_that_never_closes_and_accepts_late_is_flagged() {
    if require_root("server_that_never_closes_and_accepts_late_is_flagged") {
        server_that_never_closes(true);
    }
}

/// 4. A leak that ran before socktrace started is in the very first
///    snapshot: the leaking pid with its CLOSE_WAIT sockets, flagged.
#[test]
fn leak_before_start_is_in_the_first_snapshot() {
    if !require_root("leak_before_start_is_in_the_first_snapshot") {
        return;
    }
    let (_server, port) = http_server("1");
    let client = http_client(port, "leak", "0.02", "60", &["--await-close-wait"]);
    let waiting = client.expect("close_wait")["close_wait"].clone();
    assert_eq!(waiting, 60);
    let finished = Tracer::start(&["watch", "--json", "--once"]).wait();
    assert_eq!(finished.code, Some(0), "stderr: {:?}", finished.stderr);
    let lines = finished.json();
    let server_endpoint = loopback(port);

    let report = last_report(&lines, client.pid());
    assert_eq!(report["close_wait"], waiting, "{report:#}");
    assert_eq!(report["close_wait_oldest_lower_bound"], true, "{report:#}");
    assert_eq!(peer(report, &server_endpoint)["close_wait"], waiting);
    let alerts = lines_of(&lines, "alert", client.pid());
    let alert = alerts.first().expect("no alert in the first snapshot");
    assert_eq!(alert["kind"], "close_wait", "{alert:#}");
    assert_eq!(alert["remote"], server_endpoint.as_str(), "{alert:#}");
    let message = alert["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("60 sockets to {server_endpoint} in CLOSE_WAIT")),
        "{message}"
    );
}

/// 5. Thousands of connections a second, each closed at once (the client
///    closes first and churns through TIME_WAIT; the server closes on the
///    client's FIN): no alert for either side, even with a short
///    `--close-wait-age`.
#[test]
fn high_churn_with_prompt_closes_is_healthy() {
    if !require_root("high_churn_with_prompt_closes_is_healthy") {
        return;
    }
    let (server, port) = server(&["churn-server"]);
    let mut watch = Watch::port(port, &["--close-wait-age", "2s"]);
    let client = Role::spawn(ROLES, &["churn-client", &port.to_string(), "8"]);
    let done = client.expect("done");
    let made = done["done"].as_u64().expect("a connection count");
    let sides = [
        (client.pid(), loopback(port)),
        (server.pid(), "127.0.0.1:*".to_string()),
    ];
    // socktrace may lag behind the storm (and the server behind the client):
    // wait until it has seen every connection end on both sides, or says it
    // lost events or repaired sockets.
    for (pid, remote) in &sides {
        let counted_all = |line: &Value| {
            let closed = find_peer(line, remote).and_then(|peer| peer["closed"].as_u64());
            let lost = line["lost_events"].as_u64().unwrap_or(0);
            let repaired = line["reconciled"].as_u64().unwrap_or(0);
            is_process_of(line, *pid)
                && closed.is_some_and(|closed| closed + lost + repaired >= made)
        };
        let what = format!("the end of all {made} connections of pid {pid}");
        watch.wait_for(&what, Duration::from_secs(30), counted_all);
    }
    let lines = watch.stop();

    // Thousands a second, each counted once (exactly, unless socktrace
    // reports losses), and nothing left open.
    let rate = number(&done["per_s"]);
    println!("{made} connections at {rate:.0}/s");
    assert!(
        rate >= 1_000.0,
        "the client made only {rate:.0} connections/s"
    );
    for (pid, remote) in &sides {
        let report = last_report(&lines, *pid);
        let counted = peer(report, remote);
        let opened = counted["opened"].as_u64().expect("a count");
        assert!(opened <= made, "{made} connections made: {report:#}");
        if report["lost_events"] == 0 {
            assert_eq!(opened, made, "{report:#}");
            assert_eq!(counted["closed"], made, "{report:#}");
            assert_eq!(report["held"], 0, "{report:#}");
        }
    }
    assert_quiet(&lines, client.pid(), "churning client");
    assert_quiet(&lines, server.pid(), "churning server");
}

/// 5b. A process that reads the churning client's fd links (as lsof and
///    `ss -p` do) holds each socket file for a moment; when the client's
///    close() lands then, the kernel runs the close in the reader. The
///    close is still the client's: the reader is never credited with one.
#[test]
fn closes_while_another_process_reads_the_fds_stay_the_closers() {
    if !require_root("closes_while_another_process_reads_the_fds_stay_the_closers") {
        return;
    }
    let (server, port) = server(&["churn-server"]);
    let mut watch = Watch::port(port, &[]);
    let client = Role::spawn(ROLES, &["churn-client", &port.to_string(), "5"]);
    let reader = Role::spawn(ROLES, &["fd-reader", &client.pid().to_string(), "4"]);
    let reads = reader.expect("done")["done"].clone();
    let made = client.expect("done")["done"].clone();
    watch.wait_for("the client's closes", Duration::from_secs(10), |line| {
        is_process_of(line, client.pid()) && number(&line["closes_total"]) > 0.0
    });
    // Closes run late in the reader are reported within a second.
    thread::sleep(Duration::from_secs(2));
    let (lines, stderr) = watch.stop_with_stderr();
    println!("{made} connections, {reads} fd links read beside them");
    // A socket whose start was lost (a skipped probe run, a full ring) has
    // no known owner, and its close names whoever ran it: the reader too.
    // So, it seems, has one in the bursts where sockets end unseen (their
    // starts reach no program either: README, known problem).
    let starts_lost = loss_count(&stderr, "probe runs skipped")
        + loss_count(&stderr, "events lost (ring buffer full)")
        + loss_count(&stderr, "sockets ended unseen");
    if starts_lost > 0 {
        println!("not asserted: {starts_lost} events lost, owners unknown ({stderr:?})");
        return;
    }
    let credited: Vec<&Value> = lines
        .iter()
        .filter(|line| line["type"] == "process" && number(&line["closes_total"]) > 0.0)
        .filter(|line| !is_process_of(line, client.pid()) && !is_process_of(line, server.pid()))
        .collect();
    assert!(
        credited.is_empty(),
        "closes credited to a bystander: {credited:#?}"
    );
}

/// 6. A server that drops idle connections after 2 s, and a client that
///    comes back every 3 s, finds its connection dropped and reconnects:
///    socktrace infers the peer's idle timeout, ≈ 2 s: what the server
///    actually waited before each close (a little longer on a busy machine).
#[test]
fn peer_idle_timeout_is_inferred() {
    if !require_root("peer_idle_timeout_is_inferred") {
        return;
    }
    let (server, port) = http_server("2");
    let mut watch = Watch::port(port, &[]);
    let client = http_client(port, "reuse", "3", "5", &[]);
    let done = client.expect_within("done", Duration::from_secs(60));
    // One connection per request: each was dropped before the next one. The
    // server dropped the first four; the client closes the last one.
    assert_eq!(done["connections"], 5, "{done}");
    let mut idle_closes: Vec<f64> = (0..4)
        .map(|_| number(&server.expect("idle_closed_s")["idle_closed_s"]))
        .collect();
    idle_closes.sort_by(f64::total_cmp);
    let actual = (idle_closes[1] + idle_closes[2]) / 2.0;
    let (client_pid, server_endpoint) = (client.pid(), loopback(port));
    let with_timeout = |line: &Value| {
        is_process_of(line, client_pid)
            && find_peer(line, &server_endpoint)
                .is_some_and(|peer| !peer["peer_idle_timeout_s"].is_null())
    };
    let report = watch.wait_for(
        "the peer's idle timeout",
        Duration::from_secs(30),
        with_timeout,
    );
    let lines = watch.stop();

    let to_server = peer(&report, &server_endpoint);
    let timeout = number(&to_server["peer_idle_timeout_s"]);
    println!("inferred idle timeout {timeout} s; the server's idle closes: {idle_closes:?}");
    assert!(
        (timeout - actual).abs() <= 0.15 * actual,
        "inferred {timeout} s, but the server closed after {idle_closes:?} s: {to_server:#}"
    );
    assert_eq!(to_server["opened"], 5, "{to_server:#}");
    assert!(
        number(&to_server["peer_closed_first"]) >= 3.0,
        "{to_server:#}"
    );
    assert_quiet(&lines, client_pid, "client with an idle pool");
}

/// 7. Connections that open and then stay quiet are ESTABLISHED on both
///    ends. The kernel holds only the handshake's transitions and reports
///    them with ESTABLISHED, which may last for hours: in view at once.
#[test]
fn quiet_connections_show_as_established() {
    if !require_root("quiet_connections_show_as_established") {
        return;
    }
    let (server, port) = server(&["hoard-server"]);
    let mut watch = Watch::port(port, &[]);
    let connections = 20;
    let client = Role::spawn(
        ROLES,
        &["connect-hold", &port.to_string(), &connections.to_string()],
    );
    assert_eq!(client.expect("done")["done"], connections);
    for pid in [client.pid(), server.pid()] {
        watch.wait_for(
            &format!("{connections} ESTABLISHED sockets of pid {pid}"),
            Duration::from_secs(4),
            |line| is_process_of(line, pid) && line["sockets"]["ESTABLISHED"] == connections,
        );
    }
    let lines = watch.stop();

    for pid in [client.pid(), server.pid()] {
        let last = last_report(&lines, pid);
        assert_eq!(last["held"], connections, "{last:#}");
        let handshaking = ["SYN_SENT", "SYN_RECV"].map(|state| &last["sockets"][state]);
        assert!(handshaking.iter().all(|count| count.is_null()), "{last:#}");
    }
    let to_server = peer(last_report(&lines, client.pid()), &loopback(port));
    assert_eq!(to_server["opened"], connections, "{to_server:#}");
}

/// 8. A handshake whose SYN is dropped: the SYN's retransmission reports
///    the client in SYN_SENT while it waits, and ESTABLISHED is reported
///    when the retried SYN gets through.
#[test]
fn slow_handshake_shows_established() {
    if !require_root("slow_handshake_shows_established") {
        return;
    }
    let (mut server, port) = server(&["hoard-server", "--accept-on-command", "--full-backlog"]);
    let mut watch = Watch::port(port, &[]);
    let client = Role::spawn(ROLES, &["connect-hold", &port.to_string(), "1"]);
    // The client's SYN is dropped; its retransmission reports it.
    watch.wait_for("the client in SYN_SENT", Duration::from_secs(10), |line| {
        is_process_of(line, client.pid()) && line["sockets"]["SYN_SENT"] == 1
    });
    thread::sleep(Duration::from_millis(500));
    // Room in the queue: the SYN retried about a second after the first
    // gets through.
    server.send("accept");
    assert_eq!(client.expect("done")["done"], 1);
    watch.wait_for(
        "the client's connection ESTABLISHED",
        Duration::from_secs(10),
        |line| {
            is_process_of(line, client.pid())
                && line["sockets"]["ESTABLISHED"] == 1
                && line["sockets"]["SYN_SENT"].is_null()
        },
    );
    watch.stop();
}
