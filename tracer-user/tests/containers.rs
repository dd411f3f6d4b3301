//! Root integration tests of container support: "containers" are process
//! trees in their own PID, mount and network namespaces, made with unshare.

// A broken expectation panics: that is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{thread, time::Duration};

use common::{Container, Role, Tracer, pidns_of, require_root};
use serde_json::Value;

fn close_wait_lines(events: &[Value]) -> Vec<&Value> {
    events.iter().filter(|e| e["new"] == "CLOSE_WAIT").collect()
}

/// Two containers run the same program as their pid 1, beside the same
/// program on the host. Pointed at one container, socktrace sees only it,
/// seeded from the container's own network namespace; host-wide it keeps the
/// two pid 1s apart.
#[test]
fn container_filter_labels_and_seeding() {
    if !require_root("container_filter_labels_and_seeding") {
        return;
    }
    let mut a = Container::spawn("close_wait.py", &["4"]);
    let mut b = Container::spawn("close_wait.py", &["4"]);
    let host = Role::spawn("close_wait.py", &["4"]);
    // close_wait.py prints "<pid> ..." once its socket is in CLOSE_WAIT.
    for role in [a.role(), b.role()] {
        role.expect_line();
    }
    host.expect_line();
    let (a_pid, b_pid) = (a.init_host_pid(), b.init_host_pid());
    thread::sleep(Duration::from_millis(100));

    let only_a = Tracer::start(&[
        "trace",
        "--json",
        "--duration",
        "1",
        "--container",
        &a_pid.to_string(),
    ])
    .wait()
    .json();
    let cw = close_wait_lines(&only_a);
    assert_eq!(cw.len(), 1, "{only_a:#?}");
    assert_eq!(cw[0]["pid"], a_pid);
    assert_eq!(cw[0]["nspid"], 1, "pid as seen inside the container");
    assert_eq!(cw[0]["pidns"], pidns_of(a_pid));
    assert!(cw[0]["container"].is_object());
    assert!(
        only_a.iter().all(|e| e["pid"] == a_pid),
        "nothing from the other container or the host: {only_a:#?}"
    );

    let host_wide = Tracer::start(&["trace", "--json", "--duration", "1"])
        .wait()
        .json();
    // The containers' sockets live in their own network namespaces, which a
    // host-wide seed does not read; their later events still carry labels.
    let host_cw: Vec<_> = close_wait_lines(&host_wide)
        .into_iter()
        .filter(|e| e["pid"] == host.pid())
        .collect();
    assert_eq!(host_cw.len(), 1);
    assert!(
        host_cw[0]["container"].is_null(),
        "a host process is in no container"
    );
    assert_ne!(
        pidns_of(a_pid),
        pidns_of(b_pid),
        "two containers, two namespaces"
    );
}

/// Live events inside a container carry the in-container pid, and when the
/// container stops socktrace says so and exits 0.
#[test]
fn live_events_in_a_container_and_its_end() {
    if !require_root("live_events_in_a_container_and_its_end") {
        return;
    }
    let mut c = Container::spawn("tcp_roles.py", &["storm", "4", "20", "wait"]);
    let init = c.init_host_pid();
    let tracer = Tracer::start(&["trace", "--json", "--container", &init.to_string()]);
    let host_storm = Role::spawn("tcp_roles.py", &["storm", "4", "20"]);
    host_storm.expect("done");
    c.role().send("go");
    c.role().expect("done");
    // Stop the container: its pid 1 exits, the namespace empties.
    c.role().send("exit");
    let finished = tracer.wait();
    assert_eq!(finished.code, Some(0), "{:?}", finished.stderr);
    assert!(
        finished
            .stderr
            .iter()
            .any(|l| l.contains("has no processes left")),
        "{:?}",
        finished.stderr
    );
    let events = finished.json();
    let live: Vec<_> = events.iter().filter(|e| e["existing"] == false).collect();
    assert!(
        live.len() >= 20 * 8,
        "about ten events per connection: {}",
        live.len()
    );
    for e in &live {
        assert_eq!(e["pid"], init, "{e}");
        assert_eq!(e["nspid"], 1, "{e}");
    }
}

#[test]
fn bad_container_arguments_are_one_clear_line() {
    if !require_root("bad_container_arguments_are_one_clear_line") {
        return;
    }
    let run = |args: &[&str]| {
        let out = std::process::Command::new(common::SOCKTRACE)
            .args(args)
            .output()
            .expect("running socktrace");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["trace", "--container", "999999999"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.starts_with("socktrace: no container matches '999999999'") && err.lines().count() == 1,
        "{err}"
    );
    let (code, err) = run(&["trace", "--container", "no-such-container"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.starts_with("socktrace: no container matches 'no-such-container'")
            && err.lines().count() == 1,
        "{err}"
    );
    let (code, err) = run(&["trace", "--pidns", "/proc/self/ns/net"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("is not a PID namespace"), "{err}");
    let (code, err) = run(&["trace", "--pidns", "/no/such/file"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("/no/such/file") && err.lines().count() == 1,
        "{err}"
    );
}

/// Host-wide, the same program as pid 1 of two containers is reported as
/// two processes: same in-container pid, different host pids and namespaces.
#[test]
fn two_containers_running_the_same_program_are_reported_apart() {
    if !require_root("two_containers_running_the_same_program_are_reported_apart") {
        return;
    }
    let mut a = Container::spawn("tcp_roles.py", &["storm", "4", "10", "wait"]);
    let mut b = Container::spawn("tcp_roles.py", &["storm", "4", "10", "wait"]);
    let (a_pid, b_pid) = (a.init_host_pid(), b.init_host_pid());
    let tracer = Tracer::start(&["trace", "--json"]);
    for c in [&mut a, &mut b] {
        c.role().send("go");
        c.role().expect("done");
    }
    thread::sleep(Duration::from_millis(300));
    let events = tracer.stop().json();
    let of = |pid: u32| -> Vec<&Value> { events.iter().filter(|e| e["pid"] == pid).collect() };
    let (of_a, of_b) = (of(a_pid), of(b_pid));
    assert!(
        !of_a.is_empty() && !of_b.is_empty(),
        "both containers traced"
    );
    for (events, pid) in [(&of_a, a_pid), (&of_b, b_pid)] {
        for e in events {
            assert_eq!(e["nspid"], 1, "{e}");
            assert_eq!(e["pidns"], pidns_of(pid), "{e}");
        }
    }
    assert_ne!(of_a[0]["pidns"], of_b[0]["pidns"]);
}

/// `watch` pointed at a container finds the leak inside it and names the
/// leaking process by both pids.
#[test]
fn watch_finds_a_leak_inside_a_container() {
    if !require_root("watch_finds_a_leak_inside_a_container") {
        return;
    }
    let mut c = Container::spawn("close_wait.py", &["4"]);
    c.role().expect_line();
    let pid = c.init_host_pid();
    let lines = Tracer::start(&["watch", "--json", "--once", "--container", &pid.to_string()])
        .wait()
        .json();
    let process = lines
        .iter()
        .find(|l| l["type"] == "process" && l["pid"] == pid)
        .unwrap_or_else(|| panic!("no report for the container's process: {lines:#?}"));
    assert_eq!(process["nspid"], 1);
    assert_eq!(process["pidns"], pidns_of(pid));
    assert_eq!(process["close_wait"], 1);
    assert!(
        lines
            .iter()
            .all(|l| l["type"] != "process" || l["pid"] == pid),
        "only the container's processes: {lines:#?}"
    );
}

/// Where cgroup v2 is mounted (on its own, or as the unified hierarchy of
/// a hybrid setup); mounted by the test where nothing has (the VM guests).
fn cgroup2_mount() -> std::path::PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let mounted = mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(2) == Some(&"cgroup2")).then(|| fields[1].into())
    });
    mounted.unwrap_or_else(|| {
        let dir = std::env::temp_dir().join("socktrace-test-cgroup2");
        std::fs::create_dir_all(&dir).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "cgroup2", "none"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success(), "mounting cgroup2 at {}", dir.display());
        dir
    })
}

/// A cgroup removed at the end (after its processes have left it).
struct Cgroup(std::path::PathBuf);

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Anyone who can make a cgroup can name it: a path with an escape
/// sequence, a bell and a byte that is not UTF-8 (the kernel refuses only
/// `/` and newlines) reaches the JSON Lines escaped, and valid UTF-8.
#[test]
fn hostile_cgroup_paths_are_escaped() {
    use std::os::unix::ffi::OsStrExt as _;
    if !require_root("hostile_cgroup_paths_are_escaped") {
        return;
    }
    let root = cgroup2_mount();
    let name = b"socktrace-test-\x1b[2Jev\xffil\x07";
    let cgroup = Cgroup(root.join(std::ffi::OsStr::from_bytes(name)));
    std::fs::create_dir(&cgroup.0).unwrap();

    let mut c = Container::spawn("tcp_roles.py", &["storm", "4", "5", "wait"]);
    let init = c.init_host_pid();
    c.role().expect("waiting");
    std::fs::write(cgroup.0.join("cgroup.procs"), init.to_string()).unwrap();
    let tracer = Tracer::start(&["trace", "--json", "--container", &init.to_string()]);
    c.role().send("go");
    c.role().expect("done");
    // Labels are read from /proc when the events are shown: the process
    // stays until then.
    thread::sleep(Duration::from_secs(1));
    c.role().send("exit");
    let finished = tracer.wait();
    assert_eq!(finished.code, Some(0), "{:?}", finished.stderr);

    let events = finished.json();
    assert!(events.len() >= 5 * 8, "{} events", events.len());
    let shown = "/socktrace-test-\\u{1b}[2Jev\\xffil\\u{7}";
    for event in &events {
        let cgroup = event["container"]["cgroup"].as_str().unwrap_or_default();
        assert!(cgroup.ends_with(shown), "{event}");
    }
    for line in &finished.stdout {
        assert!(!line.contains('\x1b') && !line.contains('\x07'), "{line:?}");
    }
}
