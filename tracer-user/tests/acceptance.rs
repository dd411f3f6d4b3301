//! Acceptance tests of leak detection at both ends of the range of paces,
//! with the Go heartbeat of the incident (a request that never closes its
//! response body leaks one socket). Each prints its figures as an
//! `ACCEPTANCE:` line; docs/benchmarks.md keeps those of a recorded run.
//!
//! - fast: 10 sockets/s against a soft limit of 256, EMFILE about 25 s
//!   in: alerted within 3 s of the start, with at least 85% of its life
//!   still ahead;
//! - slow: the incident's own cadence, one socket every 30 s against
//!   65,535 (or the machine's hard limit, if lower): within 10 minutes an ETA within ±25% of the truth and a leak
//!   alert in force, while a stable pool of idle connections beside it
//!   raises nothing;
//! - stopped: a leak that hit its fd limit no longer grows, and its pile
//!   of stranded sockets is named (`close_wait`) once it is old.

// A broken expectation panics: that is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Role, Watch, go_workload, is_process_of, lines_of, number, require_root};
use serde_json::Value;

/// The Go server of the incident: `incident server -idle IDLE`.
fn server(incident: &str, idle: &str) -> (Role, u16) {
    let mut command = std::process::Command::new(incident);
    command.args(["server", "-idle", idle]);
    let server = Role::spawn_command(command);
    let port = server.expect("port")["port"].as_u64().expect("a port");
    (server, u16::try_from(port).expect("a port"))
}

fn client(incident: &str, port: u16, period: &str, nofile: &str) -> Role {
    let url = format!("http://127.0.0.1:{port}/");
    let mut command = std::process::Command::new(incident);
    command.args(["client", "-url", &url, "-period", period, "-nofile", nofile]);
    Role::spawn_command(command)
}

/// RLIMIT_NOFILE's hard limit of this process, which its children inherit.
fn hard_nofile_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we own.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    limit.rlim_max
}

#[test]
fn a_fast_leak_is_alerted_within_three_seconds() {
    if !require_root("a_fast_leak_is_alerted_within_three_seconds") {
        return;
    }
    let incident = go_workload("incident");
    let incident = incident.to_str().expect("a UTF-8 path");
    let (_server, port) = server(incident, "10s");
    let mut watch = Watch::port(port, &[]);
    let leaker = client(incident, port, "100ms", "256");
    let started = number(&leaker.expect("started")["ts"]);
    let emfile = leaker.expect_within("emfile", Duration::from_secs(60));
    let emfile_at = number(&emfile["ts"]);
    let pid = leaker.pid();
    watch.wait_for("a report after EMFILE", Duration::from_secs(5), |line| {
        is_process_of(line, pid) && number(&line["ts"]) > emfile_at
    });
    let lines = watch.stop();

    let first = lines_of(&lines, "alert", pid)
        .first()
        .copied()
        .unwrap_or_else(|| panic!("no alert for the leak: {lines:#?}"));
    let alerted_after = number(&first["ts"]) - started;
    let life = emfile_at - started;
    let ahead = (emfile_at - number(&first["ts"])) / life;
    println!(
        "ACCEPTANCE: fast leak (10/s, limit 256): EMFILE {life:.1} s after the start; {} alert {alerted_after:.2} s after the start, {:.0}% of its life ahead; eta_s then {}",
        first["kind"],
        ahead * 100.0,
        first["eta_s"]
    );
    assert!(alerted_after <= 3.0, "{first:#}");
    assert!(ahead >= 0.85, "{first:#}");
}

/// 20 sockets/s against a soft limit of 64: EMFILE about 3 s in, the
/// server's 1-s idle close leaves every one in CLOSE_WAIT, and the pile
/// stands still from then on. `close_wait` waits for the oldest to be
/// `--close-wait-age` (20 s) old, by when the pile has been flat for 15 s.
#[test]
fn a_leak_stopped_by_its_fd_limit_is_named_once_old() {
    if !require_root("a_leak_stopped_by_its_fd_limit_is_named_once_old") {
        return;
    }
    let incident = go_workload("incident");
    let incident = incident.to_str().expect("a UTF-8 path");
    let (_server, port) = server(incident, "1s");
    let mut watch = Watch::port(port, &["--close-wait-age", "20s"]);
    let leaker = client(incident, port, "50ms", "64");
    let started = number(&leaker.expect("started")["ts"]);
    let emfile = leaker.expect_within("emfile", Duration::from_secs(30));
    let pid = leaker.pid();
    let alert = watch.wait_for("the close_wait alert", Duration::from_secs(40), |line| {
        line["type"] == "alert" && line["pid"] == pid && line["kind"] == "close_wait"
    });
    let stranded =
        alert["close_wait"].as_u64().unwrap_or(0) + alert["closed_held"].as_u64().unwrap_or(0);
    let emfile_after = number(&emfile["ts"]) - started;
    let named_after = number(&alert["ts"]) - started;
    println!(
        "ACCEPTANCE: stopped leak (20/s, limit 64): EMFILE {emfile_after:.1} s after the start; close_wait {named_after:.1} s after the start, {stranded} stranded"
    );
    assert!(stranded >= 32, "{alert:#}");
    // Named by its age, once the pile had stopped growing.
    assert!(
        named_after >= 20.0 && named_after >= emfile_after + 10.0,
        "{alert:#}"
    );
    watch.stop();
}

#[test]
fn a_slow_leak_is_forecast_within_ten_minutes_and_a_pool_is_not() {
    if !require_root("a_slow_leak_is_forecast_within_ten_minutes_and_a_pool_is_not") {
        return;
    }
    let incident = go_workload("incident");
    let incident = incident.to_str().expect("a UTF-8 path");
    let (_server, port) = server(incident, "10s");
    // Ten idle connections to a server that keeps them, held for the whole
    // run.
    let pool_server = Role::spawn("watch_roles.py", &["hoard-server"]);
    let pool_port = pool_server.expect("port")["port"].to_string();
    let pool = Role::spawn("watch_roles.py", &["connect-hold", &pool_port, "10"]);
    assert_eq!(pool.expect("done")["done"], 10);
    // The incident's 65,535, or as many as this machine's hard limit allows.
    let nofile = hard_nofile_limit().min(65_535).to_string();
    let leaker = client(incident, port, "30s", &nofile);
    let pid = leaker.pid();
    let (leaker_arg, pool_arg) = (pid.to_string(), pool.pid().to_string());
    let mut watch = Watch::start(&["-p", &leaker_arg, "-p", &pool_arg]);
    let started = number(&leaker.expect("started")["ts"]);
    let report = watch.wait_for(
        "ten minutes of the slow leak",
        Duration::from_secs(660),
        |line| is_process_of(line, pid) && number(&line["ts"]) - started >= 600.0,
    );
    let lines = watch.stop();

    let reports: Vec<&Value> = lines_of(&lines, "process", pid);
    let fds = number(&report["fds"]);
    let truth = (number(&report["fd_soft_limit"]) - fds) * 30.0;
    let eta = report["eta_s"].as_f64();
    // When the forecast first came within a quarter of the truth then.
    let first_good = reports.iter().find(|r| {
        r["eta_s"].as_f64().is_some_and(|eta| {
            let truth = (number(&r["fd_soft_limit"]) - number(&r["fds"])) * 30.0;
            (eta - truth).abs() <= 0.25 * truth
        })
    });
    let first_alert = reports
        .iter()
        .find(|r| r["alerts"] != serde_json::json!([]));
    let since = |r: Option<&&Value>| r.map(|r| number(&r["ts"]) - started);
    println!(
        "ACCEPTANCE: slow leak (1 per 30 s, limit {nofile}): after {:.0} s eta_s {eta:?} against {truth:.0} s ({} over {}s); first within 25% after {:?} s; alert in force from {:?} s ({})",
        number(&report["ts"]) - started,
        match eta {
            Some(eta) => format!("{:+.1}%", (eta - truth) / truth * 100.0),
            None => "none".to_string(),
        },
        report["eta_window_s"],
        since(first_good).map(|s| s.round()),
        since(first_alert).map(|s| s.round()),
        report["alerts"],
    );
    let eta = eta.unwrap_or_else(|| panic!("no forecast after ten minutes: {report:#}"));
    assert!((eta - truth).abs() <= 0.25 * truth, "{report:#}");
    assert_ne!(report["alerts"], serde_json::json!([]), "{report:#}");

    // The pool: quiet, and not forecast to run out.
    let pool_reports = lines_of(&lines, "process", pool.pid());
    assert!(!pool_reports.is_empty());
    for pool_report in pool_reports {
        assert_eq!(
            pool_report["alerts"],
            serde_json::json!([]),
            "{pool_report:#}"
        );
        assert!(pool_report["eta_s"].is_null(), "{pool_report:#}");
    }
    assert!(lines_of(&lines, "alert", pool.pid()).is_empty());
}
