//! Root integration tests of `socktrace trace`: the real kernel programs,
//! real loopback sockets in separate processes, and the JSON a user reads.

// A broken expectation panics: that is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{thread, time::Duration};

use common::{Role, Tracer, find, on_port, port_of, require_root};
use serde_json::Value;

const ROLES: &str = "tcp_roles.py";

fn assert_owned_by(events: &[&Value], local_port: u64, pid: u64, what: &str) {
    let of_socket: Vec<_> = events
        .iter()
        .filter(|e| port_of(&e["local"]) == local_port)
        .collect();
    assert!(!of_socket.is_empty(), "no events for the {what}");
    for e in of_socket {
        assert_eq!(e["pid"], pid, "{what} event attributed elsewhere: {e}");
    }
}

fn assert_no_bystanders(events: &[&Value]) {
    for e in events {
        let comm = e["comm"].as_str().unwrap_or_default();
        assert!(
            !comm.starts_with("ksoftirqd") && !comm.starts_with("swapper"),
            "event attributed to a kernel thread: {e}"
        );
    }
}

/// The scenario of our story on loopback: the server closes first, the
/// client keeps its socket in CLOSE_WAIT, then closes it.
fn server_closes_first(version: &str) {
    let tracer = Tracer::start(&["trace", "--json"]);
    let server = Role::spawn(ROLES, &["server", version, "close-first"]);
    let server_port = server.expect("port")["port"].as_u64().unwrap();
    let mut client = Role::spawn(ROLES, &["client", version, &server_port.to_string()]);
    let client_port = client.expect("local_port")["local_port"].as_u64().unwrap();
    client.expect("close_wait");
    thread::sleep(Duration::from_millis(200));
    client.send("close");
    client.expect("closed");
    thread::sleep(Duration::from_millis(300));
    let finished = tracer.stop();
    assert_eq!(finished.code, Some(0), "stderr: {:?}", finished.stderr);

    let all = finished.json();
    let events = on_port(&all, server_port);
    let (server_pid, client_pid) = (server.pid() as u64, client.pid() as u64);

    // 1. The client's socket: the peer's FIN runs in softirq (usually in
    //    the server's context), yet the client is named.
    let cw = find(&events, client_port, "ESTABLISHED", "CLOSE_WAIT");
    assert_eq!(cw["pid"], client_pid, "{cw}");
    let last_ack = find(&events, client_port, "CLOSE_WAIT", "LAST_ACK");
    assert_eq!(last_ack["pid"], client_pid, "{last_ack}");
    assert!(
        last_ack["dwell_ns"].as_u64().unwrap() >= 150_000_000,
        "{last_ack}"
    );
    assert_owned_by(&events, client_port, client_pid, "client's socket");

    // 2. The server's accepted socket, from the handshake on.
    let accepted: Vec<_> = events
        .iter()
        .copied()
        .filter(|e| port_of(&e["local"]) == server_port && port_of(&e["remote"]) == client_port)
        .collect();
    let established = find(&accepted, server_port, "SYN_RECV", "ESTABLISHED");
    assert_eq!(established["pid"], server_pid, "{established}");
    assert_eq!(established["owner_source"], "accept");
    find(&accepted, server_port, "ESTABLISHED", "FIN_WAIT1");
    assert_owned_by(&events, server_port, server_pid, "server's sockets");

    // 3. Nobody else: no kernel thread, and never the peer.
    assert_no_bystanders(&events);
}

#[test]
fn server_closes_first_ipv4() {
    if require_root("server_closes_first_ipv4") {
        server_closes_first("4");
    }
}

#[test]
fn server_closes_first_ipv6() {
    if require_root("server_closes_first_ipv6") {
        server_closes_first("6");
    }
}

/// 4. A process forks, hands its socket to the child and exits: the socket
///    is the child's from then on.
#[test]
fn socket_handed_to_a_child_follows_the_child() {
    if !require_root("socket_handed_to_a_child_follows_the_child") {
        return;
    }
    let tracer = Tracer::start(&["trace", "--json"]);
    let mut server = Role::spawn(ROLES, &["server", "4", "hold"]);
    let server_port = server.expect("port")["port"].as_u64().unwrap();
    let mut client = Role::spawn(ROLES, &["client", "4", &server_port.to_string(), "fork"]);
    let client_port = client.expect("local_port")["local_port"].as_u64().unwrap();
    let child_pid = client.expect("forked")["forked"].as_u64().unwrap();
    let parent_pid = client.pid() as u64;
    server.expect("accepted");
    // Let the parent exit and socktrace find the new holder.
    thread::sleep(Duration::from_millis(600));
    server.send("close");
    client.expect("close_wait");
    client.send("close");
    client.expect("closed");
    thread::sleep(Duration::from_millis(300));
    let finished = tracer.stop();
    let all = finished.json();
    let events = on_port(&all, server_port);

    let connect = find(&events, 0, "CLOSE", "SYN_SENT");
    assert_eq!(
        connect["pid"], parent_pid,
        "the parent connected: {connect}"
    );
    let cw = find(&events, client_port, "ESTABLISHED", "CLOSE_WAIT");
    assert_eq!(cw["pid"], child_pid, "{cw}");
    assert_eq!(cw["owner_source"], "proc_fd", "{cw}");
    let last_ack = find(&events, client_port, "CLOSE_WAIT", "LAST_ACK");
    assert_eq!(last_ack["pid"], child_pid, "{last_ack}");
    assert_no_bystanders(&events);
}

/// Sockets that predate socktrace are reported at once, with their owner.
#[test]
fn existing_close_wait_sockets_are_seeded_with_their_owner() {
    if !require_root("existing_close_wait_sockets_are_seeded_with_their_owner") {
        return;
    }
    let holder = Role::spawn("close_wait.py", &["4"]);
    // close_wait.py prints "<pid> <server port> <client port>" (not JSON)
    // once its socket is in CLOSE_WAIT: only then does it predate socktrace.
    holder.expect_line();
    let tracer = Tracer::start(&["trace", "--json", "-p", &holder.pid().to_string()]);
    thread::sleep(Duration::from_millis(200));
    let finished = tracer.stop();
    let events = finished.json();
    let pid = holder.pid() as u64;
    let close_wait: Vec<_> = events
        .iter()
        .filter(|e| e["existing"] == true && e["new"] == "CLOSE_WAIT")
        .collect();
    assert_eq!(close_wait.len(), 1, "{events:#?}");
    assert_eq!(close_wait[0]["pid"], pid);
    assert_eq!(close_wait[0]["owner_source"], "proc_fd");
    assert!(close_wait[0]["old"].is_null() && close_wait[0]["dwell_ns"].is_null());
    assert!(
        events.iter().all(|e| e["pid"] == pid),
        "-p shows only that pid"
    );
}

#[test]
fn pid_and_port_filters() {
    if !require_root("pid_and_port_filters") {
        return;
    }
    let server = Role::spawn(ROLES, &["server", "4", "close-first"]);
    let server_port = server.expect("port")["port"].as_u64().unwrap();
    let tracer = Tracer::start(&[
        "trace",
        "--json",
        "--port",
        &server_port.to_string(),
        "-p",
        &server.pid().to_string(),
    ]);
    let client = Role::spawn(ROLES, &["client", "4", &server_port.to_string()]);
    client.expect("close_wait");
    thread::sleep(Duration::from_millis(200));
    let events = tracer.stop().json();
    assert!(!events.is_empty());
    for e in &events {
        assert_eq!(e["pid"], server.pid() as u64, "{e}");
        assert!(port_of(&e["local"]) == server_port || port_of(&e["remote"]) == server_port);
    }
}

#[test]
fn duration_ends_the_run_and_human_output_has_a_header() {
    if !require_root("duration_ends_the_run_and_human_output_has_a_header") {
        return;
    }
    let finished = Tracer::start(&["trace", "--duration", "0.5", "--port", "1"]).wait();
    assert_eq!(finished.code, Some(0));
    assert!(finished.stdout.is_empty() || finished.stdout[0].starts_with("TIME(UTC)"));
}

/// Lost events are counted and reported, never silent: stop the collector
/// while a tiny ring buffer overflows.
#[test]
fn lost_events_are_reported_on_exit() {
    if !require_root("lost_events_are_reported_on_exit") {
        return;
    }
    let tracer = Tracer::start(&["trace", "--json", "--ring-buffer-kib", "4"]);
    // SAFETY: signals to our own child.
    unsafe { libc::kill(tracer.pid() as i32, libc::SIGSTOP) };
    // ~10 events per connection against a ring that holds about 30.
    let storm = Role::spawn(ROLES, &["storm", "4", "300"]);
    storm.expect("done");
    // SAFETY: as above.
    unsafe { libc::kill(tracer.pid() as i32, libc::SIGCONT) };
    let finished = tracer.stop();
    assert_eq!(
        finished.code,
        Some(0),
        "a clean stop: {:?}",
        finished.stderr
    );
    let lost_line = finished
        .stderr
        .iter()
        .find(|l| l.contains("events lost"))
        .unwrap_or_else(|| panic!("no loss report in {:?}", finished.stderr));
    let lost: u64 = lost_line
        .trim_start_matches("socktrace: ")
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(lost > 0, "{lost_line}");
}
