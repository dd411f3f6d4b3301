//! Root tests of what socktrace holds once attached: the capabilities it
//! keeps (exactly those the README lists), `no_new_privs`, and `serve`
//! under the shipped systemd unit's capability set, each while it reads a
//! real leak, so the collector is seen to work with what it kept.

// A broken expectation panics: that is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::BTreeMap, fs, os::unix::fs::PermissionsExt as _, process::Command, time::Duration,
};

use common::{
    Role, SOCKTRACE, Tracer, require_root,
    scrape::{Served, TempDir, free_port, get, sample, serve, terminate, wait_for},
    workload,
};

const ROLES: &str = "leak_roles.py";

/// The capability sets, no_new_privs and uid of every thread of `pid`, from
/// /proc/PID/task/TID/status.
fn thread_privileges(pid: u32) -> Vec<BTreeMap<String, String>> {
    let fields = [
        "Uid",
        "CapInh",
        "CapPrm",
        "CapEff",
        "CapBnd",
        "CapAmb",
        "NoNewPrivs",
    ];
    let mut threads = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let privileges = status
            .lines()
            .filter_map(|line| line.split_once(':'))
            .filter(|(name, _)| fields.contains(name))
            .map(|(name, value)| (name.to_string(), value.trim().to_string()))
            .collect();
        threads.push(privileges);
    }
    threads
}

/// A capability set as /proc/PID/status shows it.
fn cap_mask(caps: &[u32]) -> String {
    format!(
        "{:016x}",
        caps.iter().fold(0u64, |mask, cap| mask | 1 << cap)
    )
}

const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_RESOURCE: u32 = 24;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// What the README says socktrace keeps once attached: CAP_DAC_READ_SEARCH
/// and CAP_SYS_PTRACE, and CAP_BPF where every bpf() call asks for it
/// (before Linux 5.19, with unprivileged BPF disabled).
fn kept_after_attach() -> Vec<u32> {
    let version = common::kernel_version();
    let unprivileged_bpf_disabled =
        fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled")
            .map_or(true, |v| v.trim() != "0");
    let mut kept = vec![CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE];
    if version < (5, 19) && unprivileged_bpf_disabled {
        kept.push(CAP_BPF);
    }
    kept
}

/// setpriv's arguments that make what it runs nobody.
const NOBODY: [&str; 3] = ["--reuid=65534", "--regid=65534", "--clear-groups"];

/// A server that hangs up at once, and a client that leaks `count` sockets
/// into CLOSE_WAIT. With `nobody_dir` the client runs as nobody, so that
/// reading its fds takes the capabilities socktrace keeps: the script is
/// copied there for nobody to read, and run by the system's python3 (the
/// one `cargo xtask setup` installs; a root user's own python is not
/// theirs to run).
fn leak(count: u32, nobody_dir: Option<&TempDir>) -> (Role, Role) {
    let server = Role::spawn(ROLES, &["server"]);
    let port = server.expect("port")["port"].as_u64().unwrap().to_string();
    let args = ["client", &port, &count.to_string(), "0.02", "leak"];
    let Some(dir) = nobody_dir else {
        return (server, Role::spawn(ROLES, &args));
    };
    let script = dir.0.join(ROLES);
    fs::copy(workload(ROLES), &script).unwrap();
    for (path, mode) in [(&dir.0, 0o755), (&script, 0o644)] {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }
    let mut client = Command::new("setpriv");
    client
        .args(NOBODY)
        .arg("/usr/bin/python3")
        .arg(&script)
        .args(args);
    (server, Role::spawn_command(client))
}

/// Waits until /metrics shows `count` CLOSE_WAIT sockets of `pid` and at
/// least as many open fds (read from its /proc/PID/fd).
fn wait_for_leak_with_fds(addr: &str, pid: u32, count: f64) {
    wait_for(
        "the leak and the leaker's fd count on /metrics",
        Duration::from_secs(30),
        || {
            let body = get(addr, "/metrics", None).ok()?.body;
            let leaked = sample(&body, "socktrace_close_wait_sockets", pid)? >= count;
            let fds = sample(&body, "socktrace_open_fds", pid)? >= count;
            (leaked && fds).then_some(())
        },
    );
}

#[test]
fn capabilities_not_needed_after_attach_are_dropped() {
    let test = "capabilities_not_needed_after_attach_are_dropped";
    if !require_root(test) {
        return;
    }
    let dir = TempDir::new(test);
    let (served, addr) = serve(&["--interval", "0.5"]);
    let (_server, client) = leak(12, Some(&dir));
    client.expect("done");
    wait_for_leak_with_fds(&addr, client.pid(), 12.0);

    let pid = served.0.as_ref().unwrap().pid();
    let kept = cap_mask(&kept_after_attach());
    for thread in thread_privileges(pid) {
        assert_eq!(thread["CapEff"], kept, "{thread:?}");
        assert_eq!(thread["CapPrm"], kept, "{thread:?}");
        assert_eq!(thread["CapBnd"], kept, "{thread:?}");
        assert_eq!(thread["CapInh"], cap_mask(&[]), "{thread:?}");
        assert_eq!(thread["CapAmb"], cap_mask(&[]), "{thread:?}");
        assert_eq!(thread["NoNewPrivs"], "1", "{thread:?}");
    }
    let finished = terminate(served);
    assert_eq!(finished.code, Some(0), "{:?}", finished.stderr);
    let names = if kept_after_attach().contains(&CAP_BPF) {
        "CAP_DAC_READ_SEARCH CAP_SYS_PTRACE CAP_BPF"
    } else {
        "CAP_DAC_READ_SEARCH CAP_SYS_PTRACE"
    };
    assert!(
        finished
            .stderr
            .iter()
            .any(|line| line.contains(&format!("capabilities kept: {names})"))),
        "{:?}",
        finished.stderr
    );
}

/// The capabilities the shipped systemd unit grants: as setpriv names
/// them, and their numbers.
fn unit_capabilities() -> Vec<(String, u32)> {
    let number = |name: &str| match name {
        "dac_read_search" => CAP_DAC_READ_SEARCH,
        "sys_ptrace" => CAP_SYS_PTRACE,
        "perfmon" => CAP_PERFMON,
        "bpf" => CAP_BPF,
        other => panic!("the unit grants {other}, which this test does not know"),
    };
    include_str!("../../deploy/systemd/socktrace.service")
        .lines()
        .find_map(|line| line.strip_prefix("AmbientCapabilities="))
        .expect("the unit grants ambient capabilities")
        .split_whitespace()
        .map(|cap| {
            let name = cap.trim_start_matches("CAP_").to_lowercase();
            let number = number(&name);
            (name, number)
        })
        .collect()
}

/// socktrace as the shipped unit runs it: another user, the unit's
/// capabilities as ambient ones and as the bounding set, no_new_privs, and
/// its LimitMEMLOCK=infinity (kernels before 5.11 count maps against it).
fn as_the_unit_runs(args: &[&str]) -> Command {
    let caps: Vec<String> = unit_capabilities()
        .iter()
        .map(|(name, _)| format!("+{name}"))
        .collect();
    let caps = format!("-all,{}", caps.join(","));
    // Raising the limit takes CAP_SYS_RESOURCE, which some test hosts (on
    // kernels that do not need it) lack.
    let mut command = if has_capability(CAP_SYS_RESOURCE) {
        let mut prlimit = Command::new("prlimit");
        prlimit.args(["--memlock=unlimited:unlimited", "setpriv"]);
        prlimit
    } else {
        Command::new("setpriv")
    };
    command
        .args(NOBODY)
        .arg(format!("--inh-caps={caps}"))
        .arg(format!("--ambient-caps={caps}"))
        .arg(format!("--bounding-set={caps}"))
        .arg("--no-new-privs")
        .arg(SOCKTRACE)
        .args(args);
    command
}

/// Whether the test itself holds `cap`.
fn has_capability(cap: u32) -> bool {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .unwrap();
    u64::from_str_radix(effective.trim(), 16).unwrap() & (1 << cap) != 0
}

const PERF_EVENT_PARANOID: &str = "/proc/sys/kernel/perf_event_paranoid";

/// Puts a sysctl back as it was.
struct Restore(&'static str, String);

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = fs::write(self.0, &self.1);
    }
}

/// Debian's kernels at their default kernel.perf_event_paranoid of 3 attach
/// tracepoints only for CAP_SYS_ADMIN: there socktrace must say so in one
/// line, with the remedy, which the test then applies for the rest.
fn apply_the_paranoid_remedy_if_needed() -> Option<Restore> {
    let before = fs::read_to_string(PERF_EVENT_PARANOID).ok()?;
    if before.trim().parse::<i32>().ok()? <= 2 {
        return None;
    }
    let out = as_the_unit_runs(&["trace", "--duration", "1"])
        .output()
        .unwrap();
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("socktrace: attaching to tracepoint")
                && last.contains("kernel.perf_event_paranoid is 3")
                && last.contains("set it to 2 with sysctl"),
            "{stderr}"
        );
    }
    fs::write(PERF_EVENT_PARANOID, "2").unwrap();
    Some(Restore(PERF_EVENT_PARANOID, before))
}

#[test]
fn serve_runs_with_the_systemd_units_capabilities() {
    let test = "serve_runs_with_the_systemd_units_capabilities";
    if !require_root(test) {
        return;
    }
    let _restore = apply_the_paranoid_remedy_if_needed();
    let addr = format!("127.0.0.1:{}", free_port());
    let socktrace = as_the_unit_runs(&["serve", "--listen", &addr, "--interval", "0.5"]);
    let served = Served(Some(Tracer::start_command(socktrace)));
    let (_server, client) = leak(12, None);
    client.expect("done");
    wait_for_leak_with_fds(&addr, client.pid(), 12.0);

    let pid = served.0.as_ref().unwrap().pid();
    let kept = cap_mask(&kept_after_attach());
    let unit: Vec<u32> = unit_capabilities()
        .iter()
        .map(|&(_, number)| number)
        .collect();
    for thread in thread_privileges(pid) {
        assert!(thread["Uid"].starts_with("65534"), "{thread:?}");
        assert_eq!(thread["CapEff"], kept, "{thread:?}");
        assert_eq!(thread["CapPrm"], kept, "{thread:?}");
        // Without CAP_SETPCAP the bounding set stays the unit's.
        assert_eq!(thread["CapBnd"], cap_mask(&unit), "{thread:?}");
        assert_eq!(thread["CapAmb"], cap_mask(&[]), "{thread:?}");
    }
    let finished = terminate(served);
    assert_eq!(finished.code, Some(0), "{:?}", finished.stderr);
}
