//! Root integration tests with a real container runtime: podman (with
//! runc) runs the incident's leaking heartbeat in a container of its own,
//! and socktrace from its image (`cargo xtask image`, named in
//! `SOCKTRACE_IMAGE` by `cargo xtask test`) the way the DaemonSet runs it:
//! root with four capabilities, the host's PID and network namespaces, a
//! read-only root and the host's tracefs.

// A broken expectation panics: that is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    cell::RefCell,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use common::{
    Role, SOCKTRACE, Tracer, Watch, go_workload, number, require, require_root, workload,
};
use serde_json::Value;

/// podman as it runs here (see xtask/src/image.rs): runc, cgroupfs, and
/// ulimits within this machine's hard limits.
fn podman() -> Command {
    let mut podman = Command::new("podman");
    podman.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    podman
}

const ULIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=4096:4096",
    "--ulimit",
    "nproc=4096:4096",
];

fn podman_present() -> bool {
    podman()
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Whether the test can run: root, podman, and the image under test.
fn ready(test: &str) -> Option<String> {
    if !require_root(test)
        || !require(
            test,
            podman_present(),
            "podman is missing; `cargo xtask test` installs it",
        )
    {
        return None;
    }
    let image = std::env::var("SOCKTRACE_IMAGE").unwrap_or_default();
    let built = !image.is_empty()
        && podman()
            .args(["image", "exists", &image])
            .status()
            .is_ok_and(|status| status.success());
    let missing = "no socktrace image: SOCKTRACE_IMAGE names it (`cargo xtask test` builds it)";
    require(test, built, missing).then_some(image)
}

/// An image of the incident's Go workload, statically linked, `FROM
/// scratch`: the leaking heartbeat in a container of its own.
fn incident_image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let context = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("incident-image");
        fs::create_dir_all(&context).unwrap();
        let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let status = Command::new("go")
            .args(["build", "-o"])
            .arg(context.join("incident"))
            .arg(workload("incident").join("main.go"))
            .env("CGO_ENABLED", "0")
            .env("GOCACHE", tmp.join("go-cache"))
            .env("GOPATH", tmp.join("go-path"))
            .env("GOPROXY", "off")
            .status()
            .expect("running go build");
        assert!(status.success(), "go build of the incident image failed");
        fs::write(
            context.join("Containerfile"),
            "FROM scratch\nCOPY incident /incident\nENTRYPOINT [\"/incident\"]\n",
        )
        .unwrap();
        let image = "localhost/socktrace-test-incident:latest".to_string();
        let status = podman()
            .args(["build", "--quiet", "--tag", &image])
            .arg(&context)
            .stdout(Stdio::null())
            .status()
            .expect("running podman build");
        assert!(
            status.success(),
            "podman build of the incident image failed"
        );
        image
    })
}

/// The incident's Go server on the host: it closes idle connections
/// after 1 s.
fn server() -> (Role, u16) {
    let mut command = Command::new(go_workload("incident"));
    command.args(["server", "-idle", "1s"]);
    let server = Role::spawn_command(command);
    let port = server.expect("port")["port"].as_u64().unwrap();
    (server, u16::try_from(port).unwrap())
}

/// The leaking client in a container named `name` (host network, its own
/// PID namespace and cgroup): one socket left in CLOSE_WAIT per request.
struct Leaker {
    role: Role,
    name: String,
    id: String,
    /// Its pid inside the container, as it says.
    nspid: u64,
}

impl Leaker {
    fn start(name: &str, port: u16) -> Self {
        let _ = podman().args(["rm", "--force", name]).output();
        let cidfile = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.cid"));
        let _ = fs::remove_file(&cidfile);
        let mut run = podman();
        run.args([
            "run",
            "--rm",
            "--interactive",
            "--network",
            "host",
            "--name",
            name,
        ])
        .arg("--cidfile")
        .arg(&cidfile)
        .args(ULIMITS)
        .arg(incident_image())
        .args([
            "client",
            "-url",
            &format!("http://127.0.0.1:{port}/"),
            "-period",
            "200ms",
        ]);
        let role = Role::spawn_command(run);
        let started = role.expect("started");
        let id = fs::read_to_string(&cidfile).expect("podman wrote the container id");
        Self {
            role,
            name: name.to_string(),
            id: id.trim().to_string(),
            nspid: started["pid"].as_u64().unwrap(),
        }
    }
}

impl Drop for Leaker {
    fn drop(&mut self) {
        self.role.finish();
        let _ = podman().args(["rm", "--force", &self.name]).output();
    }
}

/// The host's tracefs, which the DaemonSet mounts into the container.
fn mount_tracefs() {
    let events = Path::new("/sys/kernel/tracing/events");
    if !events.exists() {
        let status = Command::new("mount")
            .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
            .status()
            .expect("running mount");
        // A test running beside this one may have mounted it meanwhile.
        assert!(status.success() || events.exists(), "mounting tracefs");
    }
}

fn is_report_of(line: &Value, container_id: &str) -> bool {
    line["type"] == "process" && line["container"]["id"] == container_id
}

#[test]
fn socktrace_from_its_image_reports_a_leak_in_another_container() {
    const TEST: &str = "socktrace_from_its_image_reports_a_leak_in_another_container";
    let Some(image) = ready(TEST) else {
        return;
    };
    mount_tracefs();
    let (_server, port) = server();
    let leaker = Leaker::start("socktrace-test-leaker", port);

    let tracer_name = "socktrace-test-daemonset";
    let _ = podman().args(["rm", "--force", tracer_name]).output();
    let mut run = podman();
    run.args([
        "run",
        "--rm",
        "--name",
        tracer_name,
        "--pid",
        "host",
        "--network",
        "host",
    ])
    .args(["--user", "0", "--read-only", "--cap-drop", "all"])
    .args([
        "--cap-add",
        "CAP_BPF,CAP_PERFMON,CAP_SYS_PTRACE,CAP_DAC_READ_SEARCH",
    ])
    .args(["--security-opt", "seccomp=unconfined"])
    .args(["--volume", "/sys/kernel/tracing:/sys/kernel/tracing:ro"])
    .args(ULIMITS)
    .arg(&image)
    .args(["watch", "--json", "--close-wait-age", "2s"])
    .args(["--port", &port.to_string()]);
    let mut watch = Watch::of(Tracer::start_command(run));
    // The container's report with its CLOSE_WAIT sockets and its alert, in
    // either order, perhaps in one read.
    let pid = RefCell::new(Value::Null);
    let report = RefCell::new(Value::Null);
    let alert = RefCell::new(Value::Null);
    watch.wait_for(
        "the leaking container with its CLOSE_WAIT sockets and their alert",
        Duration::from_secs(90),
        |line| {
            if is_report_of(line, &leaker.id) {
                *pid.borrow_mut() = line["pid"].clone();
                if number(&line["close_wait"]) >= 5.0 {
                    *report.borrow_mut() = line.clone();
                }
            }
            if line["type"] == "alert" && line["pid"] == *pid.borrow() {
                *alert.borrow_mut() = line.clone();
            }
            !report.borrow().is_null() && !alert.borrow().is_null()
        },
    );
    let (report, alert) = (report.into_inner(), alert.into_inner());
    watch.stop();

    // Which alert comes first depends on the rates; each names the leak.
    assert!(
        ["close_wait", "fd_exhaustion"].contains(&alert["kind"].as_str().unwrap())
            && alert["message"].as_str().unwrap().contains("CLOSE_WAIT"),
        "{alert:#}"
    );
    assert_eq!(report["container"]["runtime"], "podman", "{report:#}");
    assert!(
        report["container"]["cgroup"]
            .as_str()
            .unwrap()
            .contains(&leaker.id),
        "{report:#}"
    );
    assert_eq!(
        report["nspid"], leaker.nspid,
        "the pid inside the container: {report:#}"
    );
    assert_eq!(report["comm"], "incident", "{report:#}");
}

/// One-shot `watch --once` with `--container` as given, from the host.
fn watch_container(container: &str) -> (Option<i32>, Vec<Value>, String) {
    let out = Command::new(SOCKTRACE)
        .args(["watch", "--json", "--once", "--container", container])
        .output()
        .expect("running socktrace");
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(common::parse)
        .collect();
    (
        out.status.code(),
        lines,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_container_is_named_by_its_id_a_prefix_or_its_name() {
    const TEST: &str = "a_container_is_named_by_its_id_a_prefix_or_its_name";
    if ready(TEST).is_none() {
        return;
    }
    let (_server, port) = server();
    let leaker = Leaker::start("socktrace-test-named", port);
    // Some CLOSE_WAIT sockets to be seen.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        leaker.role.expect("request");
    }
    for name in [leaker.id.as_str(), &leaker.id[..12], leaker.name.as_str()] {
        let (code, lines, stderr) = watch_container(name);
        assert_eq!(code, Some(0), "--container {name}: {stderr}");
        let processes: Vec<&Value> = lines.iter().filter(|l| l["type"] == "process").collect();
        assert!(!processes.is_empty(), "--container {name}: no process line");
        assert!(
            processes.iter().all(|line| is_report_of(line, &leaker.id)),
            "--container {name} shows other processes: {processes:#?}"
        );
    }
    let (code, _, stderr) = watch_container("0123456789abcdef");
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("socktrace: no container matches '0123456789abcdef'"),
        "{stderr}"
    );
}
