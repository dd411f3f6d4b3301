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
    let usable = |name: &str| common::doctor_says_ok(&stdout, name);
    let expected = if usable("fentry") {
        "fentry"
    } else if usable("kprobe") {
        "kprobe"
    } else {
        "tracepoint"
    };
    assert_eq!(mode, expected, "{stdout}");
}

/// One row of docs/bad-input.md.
struct BadInput {
    setup: String,
    command: String,
    stderr: String,
    exit: i32,
}

fn bad_inputs() -> Vec<BadInput> {
    // An escaped pipe (`\|`) in a cell stands aside while the row is split.
    const PIPE: &str = "\u{1}";
    let cell = |text: &str| text.trim().trim_matches('`').replace(PIPE, "|");
    include_str!("../../docs/bad-input.md")
        .lines()
        .skip_while(|line| !line.starts_with("| setup |"))
        .skip(2)
        .take_while(|line| line.starts_with('|'))
        .map(|row| {
            let inner = row.replace("\\|", PIPE);
            let inner = inner.trim().trim_start_matches('|').trim_end_matches('|');
            let cells: Vec<String> = inner.split('|').map(cell).collect();
            assert_eq!(cells.len(), 4, "a row of four cells: {row}");
            BadInput {
                setup: cells[0].clone(),
                command: cells[1].clone(),
                stderr: cells[2].clone(),
                exit: cells[3].parse().expect("an exit status"),
            }
        })
        .collect()
}

/// socktrace with `args`, in the row's setup.
fn in_setup(setup: &str, args: &[String]) -> Command {
    // Runs socktrace ("$0") in a private mount namespace after `mount`.
    let with_mount = |mount: &str| {
        let mut unshare = Command::new("unshare");
        unshare
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!("{mount} && exec \"$0\" \"$@\""))
            .arg(SOCKTRACE)
            .args(args);
        unshare
    };
    match setup {
        "" => {
            let mut socktrace = Command::new(SOCKTRACE);
            socktrace.args(args);
            socktrace
        }
        "as nobody, no capabilities" => {
            let mut setpriv = Command::new("setpriv");
            setpriv
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg("--inh-caps=-all")
                .arg(SOCKTRACE)
                .args(args);
            setpriv
        }
        "no tracefs, and nowhere to mount it" => {
            with_mount("mount -t tmpfs -o ro none /sys/kernel")
        }
        "a kernel without BTF" => with_mount("mount -t tmpfs none /sys/kernel/btf"),
        other => panic!("docs/bad-input.md has a setup this test cannot make: {other}"),
    }
}

#[test]
fn every_bad_input_in_the_table_is_one_clear_line() {
    if !require_root("every_bad_input_in_the_table_is_one_clear_line") {
        return;
    }
    let mut exited = Command::new("true").spawn().unwrap();
    exited.wait().unwrap();
    let gone = exited.id().to_string();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = listener.local_addr().unwrap().to_string();
    let fill = |text: &str| text.replace("{gone}", &gone).replace("{busy}", &busy);

    let rows = bad_inputs();
    assert!(rows.len() >= 40, "the table has {} rows", rows.len());
    for row in rows {
        let args: Vec<String> = fill(&row.command)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let out = in_setup(&row.setup, &args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let what = format!("[{}] socktrace {}", row.setup, row.command);
        assert_clean_failure(&stderr);
        assert_eq!(stderr.lines().count(), 1, "{what}: {stderr}");
        assert_eq!(stderr.trim_end(), fill(&row.stderr), "{what}");
        assert_eq!(out.status.code(), Some(row.exit), "{what}: {stderr}");
    }
}
