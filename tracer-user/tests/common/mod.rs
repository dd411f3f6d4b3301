//! Shared harness for the root integration tests: runs the real `socktrace`
//! binary against real processes and parses what a user would see.
#![allow(dead_code)] // Each test binary uses a different part of it.

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

/// Whether root tests can run. Under `SOCKTRACE_REQUIRE_ROOT_TESTS=1` (CI
/// as root) a skip is a failure, so a green run proves they ran.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("SOCKTRACE_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
        panic!("{test}: root integration tests are required but we are not root");
    }
    println!("SKIPPED: not root ({test} loads eBPF programs)");
    false
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
        let mut child = Command::new(SOCKTRACE)
            .args(args)
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
    pub fn spawn(script: &str, args: &[&str]) -> Self {
        let mut child = Command::new("python3")
            .arg(workload(script))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning python3");
        let stdin = child.stdin.take();
        let stdout = line_reader(child.stdout.take().expect("stdout"));
        Self {
            child,
            stdin,
            stdout,
        }
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
