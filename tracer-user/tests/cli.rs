//! What a user sees for bad input and from `doctor`: one clear line and a
//! non-zero exit, never a panic.

// A broken expectation panics: that is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{SOCKTRACE, require_root};

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(SOCKTRACE)
        .args(args)
        .output()
        .expect("running socktrace");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_clean_failure(stderr: &str) {
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("RUST_BACKTRACE"), "{stderr}");
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let (code, _, stderr) = run(&["trace", "--no-such-flag"]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("unexpected argument '--no-such-flag'"),
        "{stderr}"
    );
    assert_clean_failure(&stderr);
}

#[test]
fn missing_pid_is_one_clear_line() {
    if !require_root("missing_pid_is_one_clear_line") {
        return;
    }
    let (code, _, stderr) = run(&["trace", "-p", "999999999"]);
    assert_eq!(code, Some(1));
    assert_eq!(stderr.trim(), "socktrace: pid 999999999 does not exist");
}

#[test]
fn without_privileges_it_says_what_is_missing() {
    if !require_root("without_privileges_it_says_what_is_missing") {
        return;
    }
    // Drop to nobody with no capabilities, as an unprivileged user would run it.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(SOCKTRACE)
        .arg("trace")
        .output()
        .expect("running setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("needs root (CAP_BPF and CAP_PERFMON"),
        "{stderr}"
    );
}

#[test]
fn doctor_reports_the_mode_it_probed() {
    if !require_root("doctor_reports_the_mode_it_probed") {
        return;
    }
    let (code, stdout, stderr) = run(&["doctor"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("tracepoint   sock:inet_sock_set_state"),
        "{stdout}"
    );
    let mode = stdout
        .lines()
        .find_map(|l| l.strip_prefix("mode: "))
        .expect("a mode line");
    // The mode must agree with what the probes said: the first usable of
    // fentry, kprobe, tracepoint.
    let usable = |name: &str| {
        stdout
            .lines()
            .any(|l| l.starts_with("ok") && l.contains(&format!(" {name} ")))
    };
    let expected = if usable("fentry") {
        "fentry"
    } else if usable("kprobe") {
        "kprobe"
    } else {
        "tracepoint"
    };
    assert_eq!(mode, expected, "{stdout}");
}
