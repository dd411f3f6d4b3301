//! Probe modes: `doctor` chooses the richest mode the kernel allows, and every
//! mode it can use traces end to end with the right owners.
//!
//! `SOCKTRACE_EXPECT_MODES` lists the modes this kernel must support, richest
//! first, e.g. "fentry,kprobe,tracepoint" (`cargo xtask test --vm` sets it for
//! each kernel of its matrix). Then doctor must report exactly those as usable
//! and choose the first. Without it, on whatever kernel the tests run on, they
//! check that doctor is consistent and exercise every mode it finds usable.
//!
//! The attach types are checked the same way: `SOCKTRACE_EXPECT_ATTACH` is
//! the one `auto` must choose here (`tp_btf` where BTF tracepoints can use
//! socket storage, `tracepoint` before Linux 5.11); without it, a kernel
//! with BTF from 5.11 on must get `tp_btf`. Every attach type the kernel
//! allows traces with the right owners.

// A broken expectation panics: that is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{process::Command, thread, time::Duration};

use common::{Role, SOCKTRACE, Tracer, find, on_port, port_of, require_root};

const EXPECT_MODES: &str = "SOCKTRACE_EXPECT_MODES";
const EXPECT_ATTACH: &str = "SOCKTRACE_EXPECT_ATTACH";
/// Set to force an attach type for the whole suite (the fallback's run).
const FORCED_ATTACH: &str = "SOCKTRACE_ATTACH";
/// Richest first, the order in which `--probe-mode auto` tries them.
const MODES: [&str; 3] = ["fentry", "kprobe", "tracepoint"];

struct Doctor {
    report: String,
    chosen: String,
    usable: Vec<&'static str>,
    /// The `attach:` line's attach type.
    attach: String,
    tp_btf_usable: bool,
}

fn doctor() -> Doctor {
    let out = Command::new(SOCKTRACE)
        .arg("doctor")
        .output()
        .expect("running socktrace doctor");
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "doctor failed: {report}{stderr}");
    let chosen = report
        .lines()
        .find_map(|line| line.strip_prefix("mode: "))
        .unwrap_or_else(|| panic!("no mode line in {report}"))
        .trim()
        .to_owned();
    // fentry and kprobe have a line each ("ok   fentry ..."); the tracepoint
    // mode needs only the tracepoints every mode needs, so doctor succeeding
    // means it is usable.
    let usable = MODES
        .into_iter()
        .filter(|&mode| mode == "tracepoint" || common::doctor_says_ok(&report, mode))
        .collect();
    let attach = report
        .lines()
        .find_map(|line| line.strip_prefix("attach: "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no attach line in {report}"))
        .to_owned();
    let tp_btf_usable = common::tp_btf_usable_in(&report);
    Doctor {
        report,
        chosen,
        usable,
        attach,
        tp_btf_usable,
    }
}

fn expected_modes() -> Option<Vec<String>> {
    let list = std::env::var(EXPECT_MODES).ok()?;
    Some(
        list.split(',')
            .map(|mode| mode.trim().to_owned())
            .filter(|mode| !mode.is_empty())
            .collect(),
    )
}

#[test]
fn doctor_chooses_the_expected_mode() {
    if !require_root("doctor_chooses_the_expected_mode") {
        return;
    }
    let doctor = doctor();
    match expected_modes() {
        Some(expected) => {
            assert_eq!(doctor.usable, expected, "usable modes in {}", doctor.report);
            assert_eq!(doctor.chosen, expected[0], "{}", doctor.report);
        }
        None => {
            println!("{EXPECT_MODES} is not set: checking only that doctor is consistent");
            assert_eq!(doctor.chosen, doctor.usable[0], "{}", doctor.report);
        }
    }
}

#[test]
fn doctor_chooses_the_expected_attach() {
    if !require_root("doctor_chooses_the_expected_attach") {
        return;
    }
    let doctor = doctor();
    let natural = if doctor.tp_btf_usable {
        "tp_btf"
    } else {
        "tracepoint"
    };
    match std::env::var(FORCED_ATTACH) {
        Ok(forced) if forced != "auto" => assert_eq!(doctor.attach, forced, "{}", doctor.report),
        _ => assert_eq!(doctor.attach, natural, "{}", doctor.report),
    }
    // Without an expectation, `doctor()` has checked the kernel's own rule
    // (`common::tp_btf_usable_in`).
    if let Ok(expected) = std::env::var(EXPECT_ATTACH) {
        assert_eq!(natural, expected, "{}", doctor.report);
    }
}

/// Both attach types trace with the right owners where the kernel allows
/// them; forcing tp_btf where it does not is one clear line.
#[test]
fn every_attach_type_attributes_owners() {
    if !require_root("every_attach_type_attributes_owners") {
        return;
    }
    let doctor = doctor();
    server_closes_first("tracepoint", "tracepoint");
    if doctor.tp_btf_usable {
        server_closes_first("tracepoint", "tp_btf");
        return;
    }
    let out = Command::new(SOCKTRACE)
        .args(["trace", "--attach", "tp_btf", "--duration", "1"])
        .output()
        .expect("running socktrace");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    println!("SKIPPED: tp_btf is not usable on this kernel; forcing it fails with: {stderr}");
}

#[test]
fn fentry_mode_attributes_owners() {
    if require_root("fentry_mode_attributes_owners") {
        traces_in("fentry");
    }
}

#[test]
fn kprobe_mode_attributes_owners() {
    if require_root("kprobe_mode_attributes_owners") {
        traces_in("kprobe");
    }
}

#[test]
fn tracepoint_mode_attributes_owners() {
    if require_root("tracepoint_mode_attributes_owners") {
        traces_in("tracepoint");
    }
}

/// Runs the attribution scenario with `--probe-mode <mode>`. Where doctor
/// proves the kernel lacks the mode, forcing it must instead fail with one
/// clear line.
fn traces_in(mode: &str) {
    let doctor = doctor();
    if doctor.usable.contains(&mode) {
        server_closes_first(mode, &doctor.attach);
        return;
    }
    if let Some(expected) = expected_modes() {
        assert!(
            !expected.iter().any(|m| m == mode),
            "{EXPECT_MODES} says {mode} is usable here, doctor says not: {}",
            doctor.report
        );
    }
    let out = Command::new(SOCKTRACE)
        .args(["trace", "--probe-mode", mode, "--duration", "1"])
        .output()
        .expect("running socktrace");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "socktrace: --probe-mode {mode} is not usable here: "
        )),
        "{stderr}"
    );
    println!("SKIPPED: {mode} mode is not usable on this kernel; forcing it fails with: {stderr}");
}

/// A server that closes first against a client that holds its socket in
/// CLOSE_WAIT: every transition of both sockets belongs to its owner, though
/// the peer's packets drive half of them.
fn server_closes_first(mode: &str, attach: &str) {
    let tracer = Tracer::start(&["trace", "--json", "--probe-mode", mode, "--attach", attach]);
    let server = Role::spawn("tcp_roles.py", &["server", "4", "close-first"]);
    let server_port = server.expect("port")["port"].as_u64().unwrap();
    let mut client = Role::spawn("tcp_roles.py", &["client", "4", &server_port.to_string()]);
    let client_port = client.expect("local_port")["local_port"].as_u64().unwrap();
    client.expect("close_wait");
    thread::sleep(Duration::from_millis(200));
    client.send("close");
    client.expect("closed");
    thread::sleep(Duration::from_millis(300));
    let finished = tracer.stop();
    assert_eq!(finished.code, Some(0), "stderr: {:?}", finished.stderr);
    let announced = format!("({mode} mode; {attach} attach");
    assert!(
        finished.stderr.iter().any(|line| line.contains(&announced)),
        "socktrace did not run in {mode} mode with {attach}: {:?}",
        finished.stderr
    );

    let all = finished.json();
    let events = on_port(&all, server_port);
    let (server_pid, client_pid) = (server.pid() as u64, client.pid() as u64);

    // The port is not bound yet when connect() moves the socket to SYN_SENT.
    let connect = find(&events, 0, "CLOSE", "SYN_SENT");
    assert_eq!(connect["pid"], client_pid, "{connect}");
    assert_eq!(connect["owner_source"], "connect", "{connect}");
    let close_wait = find(&events, client_port, "ESTABLISHED", "CLOSE_WAIT");
    assert_eq!(close_wait["pid"], client_pid, "{close_wait}");
    let last_ack = find(&events, client_port, "CLOSE_WAIT", "LAST_ACK");
    assert_eq!(last_ack["pid"], client_pid, "{last_ack}");

    let accepted: Vec<_> = events
        .iter()
        .copied()
        .filter(|e| port_of(&e["remote"]) == client_port)
        .collect();
    let established = find(&accepted, server_port, "SYN_RECV", "ESTABLISHED");
    assert_eq!(established["pid"], server_pid, "{established}");
    assert_eq!(established["owner_source"], "accept", "{established}");
    let fin_wait = find(&accepted, server_port, "ESTABLISHED", "FIN_WAIT1");
    assert_eq!(fin_wait["pid"], server_pid, "{fin_wait}");

    // Nobody else: never the peer, never a kernel thread.
    for event in &events {
        let owner = if port_of(&event["local"]) == server_port {
            server_pid
        } else {
            client_pid
        };
        assert_eq!(event["pid"], owner, "attributed elsewhere: {event}");
    }
}
