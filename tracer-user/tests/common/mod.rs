//! Shared harness for the root integration tests: runs the real `socktrace`
//! binary against real processes and parses what a user would see.
#![allow(dead_code)] // Each test binary uses a different part of it.

pub mod scrape;

use std::{
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc::{Receiver, channel},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

pub const SOCKTRACE: &str = env!("CARGO_BIN_EXE_socktrace");

/// Whether `test` can run: `present` says that what it needs is there,
/// `missing` what is not. Under `SOCKTRACE_REQUIRE_ROOT_TESTS=1` (CI as
/// root, where `cargo xtask setup` installed everything) a skip is a
/// failure, so a green run proves they ran.
pub fn require(test: &str, present: bool, missing: &str) -> bool {
    if present {
        return true;
    }
    if std::env::var("SOCKTRACE_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
        panic!("{test}: {missing}, and the root integration tests are required");
    }
    println!("SKIPPED: {missing} ({test})");
    false
}

/// Whether a `socktrace doctor` report has an "ok" line for `feature` (a
/// probe mode or an attach type).
pub fn doctor_says_ok(report: &str, feature: &str) -> bool {
    report.lines().any(|line| {
        let mut words = line.split_whitespace();
        words.next() == Some("ok") && words.next() == Some(feature)
    })
}

/// Whether this kernel has what the `tp_btf` attach needs: BTF, and socket
/// storage in tracing programs (Linux 5.11). Where it has, doctor must find
/// it usable: a program of ours that the verifier refuses then fails the
/// tests instead of turning them into skips and fallback runs.
fn kernel_allows_tp_btf() -> bool {
    std::path::Path::new("/sys/kernel/btf/vmlinux").exists() && kernel_version() >= (5, 11)
}

/// The running kernel's (major, minor) version.
pub fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .expect("reading /proc/sys/kernel/osrelease");
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let mut next = || numbers.next().expect("a version in osrelease");
    (next(), next())
}

/// Whether `socktrace doctor` finds BTF tracepoints usable here; panics
/// where the kernel allows them and doctor does not (see
/// [`kernel_allows_tp_btf`]).
pub fn tp_btf_usable() -> bool {
    let out = Command::new(SOCKTRACE)
        .arg("doctor")
        .output()
        .expect("running socktrace doctor");
    tp_btf_usable_in(&String::from_utf8_lossy(&out.stdout))
}

/// [`tp_btf_usable`], from a doctor report already made.
pub fn tp_btf_usable_in(report: &str) -> bool {
    let usable = doctor_says_ok(report, "tp_btf");
    assert!(
        usable || !kernel_allows_tp_btf(),
        "this kernel allows BTF tracepoints, yet doctor refuses them:\n{report}"
    );
    usable
}

/// The gate of every test that loads the eBPF programs.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    require(test, root, "not root: the test loads eBPF programs")
}

pub fn workload(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/workloads")
        .join(name)
}

/// Reads lines from a child's stream on a thread, so tests can wait with a
/// timeout.
fn line_reader(stream: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A running `socktrace` whose stdout is collected.
pub struct Tracer {
    child: Child,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
    stderr_seen: Vec<String>,
}

pub struct Finished {
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
    pub code: Option<i32>,
}

impl Finished {
    pub fn json(&self) -> Vec<Value> {
        self.stdout
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
            .collect()
    }
}

impl Tracer {
    /// Starts socktrace and waits until it reports that it is tracing.
    pub fn start(args: &[&str]) -> Self {
        let mut socktrace = Command::new(SOCKTRACE);
        socktrace.args(args);
        Self::start_command(socktrace)
    }

    /// [`Tracer::start`] for socktrace as `command` runs it (e.g. in a
    /// container).
    pub fn start_command(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning socktrace");
        let stdout = line_reader(child.stdout.take().expect("stdout"));
        let stderr = line_reader(child.stderr.take().expect("stderr"));
        let mut tracer = Self {
            child,
            stdout,
            stderr,
            stderr_seen: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            match tracer.stderr.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    let ready = line.contains("socktrace: tracing");
                    tracer.stderr_seen.push(line);
                    if ready {
                        return tracer;
                    }
                }
                Err(_) => {
                    if let Ok(Some(status)) = tracer.child.try_wait() {
                        panic!(
                            "socktrace exited early ({status}): {:?}",
                            tracer.stderr_seen
                        );
                    }
                }
            }
        }
        panic!("socktrace did not start tracing: {:?}", tracer.stderr_seen);
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it still runs, and what it wrote to stderr so far: what a
    /// test that gave up waiting should show.
    pub fn state(&mut self) -> String {
        self.stderr_seen.extend(self.stderr.try_iter());
        let running = match self.child.try_wait() {
            Ok(None) => "running".to_string(),
            Ok(Some(status)) => format!("exited ({status})"),
            Err(e) => format!("unknown ({e})"),
        };
        format!("socktrace {running}, stderr: {:#?}", self.stderr_seen)
    }

    /// Lines printed so far (without stopping).
    pub fn lines_so_far(&self, into: &mut Vec<String>) {
        while let Ok(line) = self.stdout.try_recv() {
            into.push(line);
        }
    }

    /// SIGINT, then collect everything it printed.
    pub fn stop(self) -> Finished {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.wait()
    }

    /// Waits for socktrace to exit on its own (e.g. `--duration`).
    pub fn wait(mut self) -> Finished {
        let status = self.child.wait().expect("waiting for socktrace");
        let stdout = self.stdout.iter().collect();
        let mut stderr = std::mem::take(&mut self.stderr_seen);
        stderr.extend(self.stderr.iter());
        Finished {
            stdout,
            stderr,
            code: status.code(),
        }
    }
}

/// A workload process that reports its steps as JSON lines.
pub struct Role {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Receiver<String>,
}

impl Role {
    /// `python3 tests/workloads/<script> <args>`.
    pub fn spawn(script: &str, args: &[&str]) -> Self {
        let mut python = Command::new("python3");
        python.arg(workload(script)).args(args);
        Self::spawn_command(python)
    }

    /// Any workload command (a Go workload, or one inside a [`NetNs`]).
    pub fn spawn_command(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {command:?}: {e}"));
        let stdin = child.stdin.take();
        let stdout = line_reader(child.stdout.take().expect("stdout"));
        Self {
            child,
            stdin,
            stdout,
        }
    }

    /// Closes the workload's stdin: it lets go of everything and exits.
    pub fn finish(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }

    /// The next reported step that has `key`.
    pub fn expect(&self, key: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(line) = self.stdout.recv_timeout(left) else {
                break;
            };
            let value: Value = serde_json::from_str(&line).expect("workload prints JSON");
            if value.get(key).is_some() {
                return value;
            }
        }
        panic!("workload never reported {key:?}");
    }

    /// The next line, whatever it is (for workloads that do not print JSON).
    pub fn expect_line(&self) -> String {
        self.stdout
            .recv_timeout(Duration::from_secs(30))
            .expect("workload printed nothing")
    }

    pub fn send(&mut self, command: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{command}").expect("writing to the workload");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Events about connections on `port` (either end).
pub fn on_port(events: &[Value], port: u64) -> Vec<&Value> {
    events
        .iter()
        .filter(|e| {
            let ends = [e["local"].as_str(), e["remote"].as_str()];
            ends.iter()
                .flatten()
                .any(|a| a.rsplit(':').next().and_then(|p| p.parse::<u64>().ok()) == Some(port))
        })
        .collect()
}

pub fn port_of(addr: &Value) -> u64 {
    addr.as_str()
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

/// The event on the socket whose local port is `local_port`, changing
/// `old` -> `new`.
pub fn find<'a>(events: &[&'a Value], local_port: u64, old: &str, new: &str) -> &'a Value {
    events
        .iter()
        .find(|e| port_of(&e["local"]) == local_port && e["old"] == old && e["new"] == new)
        .copied()
        .unwrap_or_else(|| panic!("no {old} -> {new} on local port {local_port} in {events:#?}"))
}

/// A "container": a process tree in its own PID, mount and network
/// namespaces (loopback up), made with `unshare`. Its command runs as pid 1.
pub struct Container {
    unshare: Role,
}

impl Container {
    /// Runs `python3 <workload> <args>` as the container's pid 1.
    pub fn spawn(script: &str, args: &[&str]) -> Self {
        let command = format!(
            "ip link set lo up && exec python3 {} {}",
            workload(script).display(),
            args.join(" ")
        );
        let mut child = Command::new("unshare")
            .args([
                "--pid",
                "--net",
                "--mount",
                "--fork",
                "--mount-proc",
                "sh",
                "-c",
            ])
            .arg(command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning unshare");
        let stdin = child.stdin.take();
        let stdout = line_reader(child.stdout.take().expect("stdout"));
        Self {
            unshare: Role {
                child,
                stdin,
                stdout,
            },
        }
    }

    /// Host pid of the container's pid 1 (the child of `unshare`).
    pub fn init_host_pid(&self) -> u32 {
        let unshare = self.unshare.pid();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let children =
                std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children"))
                    .unwrap_or_default();
            if let Some(pid) = children
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
            {
                return pid;
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!("the container's init never started");
    }

    pub fn role(&mut self) -> &mut Role {
        &mut self.unshare
    }
}

/// Inode of a process's PID namespace.
pub fn pidns_of(pid: u32) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(format!("/proc/{pid}/ns/pid"))
        .expect("reading a PID namespace")
        .ino()
}

impl Role {
    /// The next reported step that has `key`, waiting up to `timeout` (for
    /// steps that take longer than [`Role::expect`] allows).
    pub fn expect_within(&self, key: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        let found = std::iter::from_fn(|| {
            let left = deadline.checked_duration_since(Instant::now())?;
            self.stdout.recv_timeout(left).ok()
        })
        .map(|line| serde_json::from_str::<Value>(&line).expect("workload prints JSON"))
        .find(|value| value.get(key).is_some());
        found.unwrap_or_else(|| panic!("workload never reported {key:?} within {timeout:?}"))
    }
}

/// A running `socktrace watch --json` and the lines it printed so far.
pub struct Watch {
    tracer: Tracer,
    lines: Vec<Value>,
}

impl Watch {
    pub fn start(args: &[&str]) -> Self {
        let args: Vec<&str> = ["watch", "--json"].iter().chain(args).copied().collect();
        Self::of(Tracer::start(&args))
    }

    /// The lines of a `watch --json` started otherwise.
    pub fn of(tracer: Tracer) -> Self {
        Self {
            tracer,
            lines: Vec::new(),
        }
    }

    /// Watches only the connections of one server port, so that other tests
    /// running at the same time stay out of the figures.
    pub fn pid(&self) -> u32 {
        self.tracer.pid()
    }

    pub fn port(port: u16, args: &[&str]) -> Self {
        let port = port.to_string();
        let args: Vec<&str> = ["--port", port.as_str()]
            .iter()
            .chain(args)
            .copied()
            .collect();
        Self::start(&args)
    }

    /// Takes in what socktrace printed so far.
    fn collect(&mut self) {
        let mut text = Vec::new();
        self.tracer.lines_so_far(&mut text);
        self.lines.extend(text.iter().map(|line| parse(line)));
    }

    /// Where the lines printed from now on start: for a wait on what an
    /// action makes socktrace print, marked before the action (which may be
    /// printed before the action returns).
    pub fn mark(&mut self) -> usize {
        self.collect();
        self.lines.len()
    }

    /// The first line printed from now on that satisfies `wanted`.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        wanted: impl Fn(&Value) -> bool,
    ) -> Value {
        let from = self.mark();
        self.wait_since(from, what, timeout, wanted)
    }

    /// The first line printed since `mark` that satisfies `wanted`.
    pub fn wait_since(
        &mut self,
        mark: usize,
        what: &str,
        timeout: Duration,
        wanted: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        let mut checked = mark;
        loop {
            self.collect();
            if let Some(found) = self.lines[checked..].iter().find(|line| wanted(line)) {
                return found.clone();
            }
            checked = self.lines.len();
            if Instant::now() >= deadline {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        // The alerts say most about what socktrace made of the run.
        let alerts: Vec<String> = self
            .lines
            .iter()
            .filter(|line| line["type"] == "alert")
            .map(Value::to_string)
            .collect();
        panic!(
            "socktrace never reported {what} within {timeout:?}; last lines: {:#?}; alerts: {:#?}; {}",
            self.lines.iter().rev().take(4).collect::<Vec<_>>(),
            alerts,
            self.tracer.state()
        );
    }

    /// Stops socktrace: everything it printed.
    pub fn stop(self) -> Vec<Value> {
        self.stop_with_stderr().0
    }

    /// The lines, and what socktrace wrote to stderr (its loss counts).
    pub fn stop_with_stderr(mut self) -> (Vec<Value>, Vec<String>) {
        let finished = self.tracer.stop();
        assert_eq!(finished.code, Some(0), "stderr: {:?}", finished.stderr);
        self.lines.extend(finished.json());
        (self.lines, finished.stderr)
    }
}

/// A loss count socktrace wrote at exit ("socktrace: <count> <what>"); 0
/// when it wrote none.
pub fn loss_count(stderr: &[String], what: &str) -> u64 {
    stderr
        .iter()
        .find(|line| line.contains(what))
        .and_then(|line| {
            line.trim_start_matches("socktrace: ")
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0)
}

pub fn parse(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON line {line:?}: {e}"))
}

/// Lines of one type (`process` or `alert`) about one pid, in time order.
pub fn lines_of<'a>(lines: &'a [Value], kind: &str, pid: u32) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|line| line["type"] == kind && line["pid"] == pid)
        .collect()
}

pub fn last_report(lines: &[Value], pid: u32) -> &Value {
    lines_of(lines, "process", pid)
        .last()
        .copied()
        .unwrap_or_else(|| panic!("no process line for pid {pid}"))
}

/// The entry of `remote` in a process line's `peers`, if it has one.
pub fn find_peer<'a>(report: &'a Value, remote: &str) -> Option<&'a Value> {
    report["peers"]
        .as_array()?
        .iter()
        .find(|peer| peer["remote"] == remote)
}

pub fn peer<'a>(report: &'a Value, remote: &str) -> &'a Value {
    find_peer(report, remote).unwrap_or_else(|| panic!("no peer {remote} in {report:#}"))
}

pub fn number(value: &Value) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("not a number: {value}"))
}

pub fn is_process_of(line: &Value, pid: u32) -> bool {
    line["type"] == "process" && line["pid"] == pid
}

/// No alert was raised for `pid`, and none was ever in force.
pub fn assert_quiet(lines: &[Value], pid: u32, who: &str) {
    let alerts = lines_of(lines, "alert", pid);
    assert!(
        alerts.is_empty(),
        "{who} (pid {pid}) was flagged: {alerts:#?}"
    );
    let reports = lines_of(lines, "process", pid);
    assert!(!reports.is_empty(), "socktrace never reported the {who}");
    for report in reports {
        assert_eq!(report["alerts"], serde_json::json!([]), "{who}: {report:#}");
    }
}

pub fn loopback(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// A Go workload of `tests/workloads/<name>/main.go`, built once (and again
/// only when its source is newer), into cargo's temporary directory.
pub fn go_workload(name: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = BUILT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let source = workload(name).join("main.go");
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let binary = tmp.join(format!("workload-{name}"));
    let modified = |path: &PathBuf| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    if modified(&binary).is_some_and(|built| modified(&source).is_some_and(|src| built >= src)) {
        return binary;
    }
    // Built aside and renamed into place: another test process (xtask runs
    // the ten-minute forecast beside the suite) may look for it meanwhile.
    let partial = tmp.join(format!("workload-{name}.{}", std::process::id()));
    let status = Command::new("go")
        .args(["build", "-o"])
        .arg(&partial)
        .arg(&source)
        .env("GOCACHE", tmp.join("go-cache"))
        .env("GOPATH", tmp.join("go-path"))
        // The workloads use the standard library only: nothing to fetch.
        .env("GOPROXY", "off")
        .status()
        .expect("running go build (golang-go is installed by `cargo xtask test`)");
    assert!(status.success(), "go build of {} failed", source.display());
    std::fs::rename(&partial, &binary).expect("moving the built workload into place");
    binary
}

/// A network namespace of the test's own, with loopback up and the given
/// sysctls (`net.ipv4.tcp_fin_timeout=2`): time compressed where only this
/// test lives. Deleted when dropped.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(name: &str, sysctls: &[&str]) -> Self {
        let name = format!("st-{name}-{}", std::process::id());
        let run = |args: &[&str]| {
            let status = Command::new("ip").args(args).status().expect("running ip");
            assert!(status.success(), "ip {args:?} failed");
        };
        // A namespace left by an earlier run that was killed.
        let _ = Command::new("ip")
            .args(["netns", "delete", &name])
            .stderr(Stdio::null())
            .status();
        run(&["netns", "add", &name]);
        let netns = Self { name };
        netns.run(&["ip", "link", "set", "lo", "up"]);
        for sysctl in sysctls {
            netns.run(&["sysctl", "-qw", sysctl]);
        }
        netns
    }

    /// Runs a setup command inside, which must succeed.
    pub fn run(&self, command: &[&str]) {
        let status = self
            .command(command)
            .status()
            .expect("running ip netns exec");
        assert!(status.success(), "{command:?} in {} failed", self.name);
    }

    /// `command` to run inside (`ip netns exec` execs it: same pid).
    pub fn command(&self, command: &[&str]) -> Command {
        let mut exec = Command::new("ip");
        exec.args(["netns", "exec", &self.name]).args(command);
        exec
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}
