//! One guest: boots a kernel under QEMU, runs `socktrace doctor` and the
//! test binaries in it, and reads the results off its serial console.

use std::{
    fs::{self, File},
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc::{RecvTimeoutError, channel},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{
    SuiteBinary, TestBuild,
    debian::{self, Kernel},
    initramfs,
};
use crate::cmd::shell_quote;

pub const QEMU: &str = "qemu-system-x86_64";

/// Modules loaded at boot (built-in ones are skipped): 9p over virtio and
/// overlayfs, to mount the host's root writable. The guest cannot load
/// modules on demand: the host's /lib/modules has none of its kernel's.
const MODULES: [&str; 4] = ["virtio_pci", "9pnet_virtio", "9p", "overlay"];
/// virtio-rng seeds the guest's entropy pool at once, so nothing waits on
/// getrandom() at boot.
const OPTIONAL_MODULES: [&str; 1] = ["virtio_rng"];

/// Guest resources: the tests are sequential, and 2 GiB holds the tmpfs
/// upper layer and the socket storms with room to spare.
const MEMORY: &str = "2G";
const CPUS: &str = "2";

/// Console markers written by the guest script.
const BEGIN_TEST: &str = "VM-TEST-BEGIN ";
const END_TEST: &str = "VM-TEST-END ";
const END_DOCTOR: &str = "VM-DOCTOR-END ";
const DONE: &str = "VM-DONE";
const ERROR: &str = "VM-ERROR ";

pub struct Run<'a> {
    /// The kernel's name in the matrix, which prefixes its console lines.
    pub label: &'a str,
    pub kernel: &'a Kernel,
    pub busybox: &'a Path,
    pub build: &'a TestBuild,
    /// The test binaries to run, in order.
    pub suite: &'a [&'a SuiteBinary],
    /// Environment for the test binaries.
    pub env: Vec<(&'a str, String)>,
    /// Where the initramfs, the guest script and the console log go.
    pub dir: PathBuf,
    pub timeout: Duration,
}

/// What one guest reported.
#[derive(Debug, Default)]
pub struct Report {
    pub release: String,
    /// The `mode:` line of `socktrace doctor`.
    pub mode: Option<String>,
    /// Its `attach:` line (the attach type and the per-socket store).
    pub attach: Option<String>,
    pub passed: u32,
    pub failed: u32,
    /// "<binary>: <test>" of each failure.
    pub failures: Vec<String>,
    /// Why the run is incomplete (timeout, crash), if it is.
    pub problem: Option<String>,
    /// The guest kernel's first "Oops:" or "Kernel panic" line, if any.
    pub kernel_crash: Option<String>,
    /// The first boot's `kernel_crash`, when this report is of a second.
    pub crashed_before: Option<String>,
    finished: bool,
    /// The test binary running now, and whether it printed its result.
    binary: Option<String>,
    binary_result_seen: bool,
    in_doctor: bool,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.finished && self.problem.is_none() && self.failed == 0 && self.mode.is_some()
    }

    /// Reads one console line.
    fn line(&mut self, line: &str) {
        // Kernel messages, "[  122.825284] Oops: int3: 0000 [#1] ...", may
        // land in the middle of a test's line.
        let kernel_crash =
            line.contains("] Oops: ") || line.contains("] Kernel panic - not syncing");
        if kernel_crash && self.kernel_crash.is_none() {
            self.kernel_crash = Some(line.to_owned());
        }
        if line.starts_with("VM-DOCTOR-BEGIN") {
            self.in_doctor = true;
        } else if let Some(status) = line.strip_prefix(END_DOCTOR) {
            self.in_doctor = false;
            if status != "status=0" {
                self.failed += 1;
                self.failures.push(format!("socktrace doctor ({status})"));
            }
        } else if let Some(mode) = line.strip_prefix("mode: ").filter(|_| self.in_doctor) {
            self.mode = Some(mode.trim().to_owned());
        } else if let Some(attach) = line.strip_prefix("attach: ").filter(|_| self.in_doctor) {
            self.attach = Some(attach.trim().to_owned());
        } else if let Some(binary) = line.strip_prefix(BEGIN_TEST) {
            self.binary = Some(binary.trim().to_owned());
            self.binary_result_seen = false;
        } else if let Some(rest) = line.strip_prefix("test result: ") {
            self.binary_result_seen = true;
            self.passed += count_before(rest, "passed;");
            self.failed += count_before(rest, "failed;");
        } else if let Some(test) = line
            .strip_prefix("test ")
            .and_then(|rest| rest.strip_suffix(" ... FAILED"))
        {
            let binary = self.binary.as_deref().unwrap_or("?");
            self.failures.push(format!("{binary}: {test}"));
        } else if let Some(rest) = line.strip_prefix(END_TEST) {
            // A binary that died before its summary (a crash, a panic in a
            // harness thread) counts as one failure.
            if !self.binary_result_seen && !rest.ends_with("status=0") {
                self.failed += 1;
                self.failures
                    .push(format!("{rest}: exited without a test result"));
            }
            self.binary = None;
        } else if line == DONE {
            self.finished = true;
        } else if let Some(error) = line.strip_prefix(ERROR) {
            self.problem = Some(error.to_owned());
        }
    }
}

/// N from "... N passed; ..." (0 if absent).
fn count_before(summary: &str, label: &str) -> u32 {
    let words: Vec<&str> = summary.split_whitespace().collect();
    words
        .windows(2)
        .find(|pair| pair[1] == label)
        .and_then(|pair| pair[0].parse().ok())
        .unwrap_or(0)
}

/// Boots the guest, streams its console (prefixed with the label) and
/// returns what it reported. Errors are for what stops the guest from
/// starting; a guest that fails or hangs is a report with a problem.
pub fn boot(run: &Run) -> anyhow::Result<Report> {
    fs::create_dir_all(&run.dir).with_context(|| format!("creating {}", run.dir.display()))?;
    let script_path = run.dir.join("guest.sh");
    fs::write(&script_path, guest_script(run))
        .with_context(|| format!("writing {}", script_path.display()))?;
    let modules = debian::modules(run.kernel, &MODULES, &OPTIONAL_MODULES)
        .with_context(|| format!("picking the modules of {}", run.kernel.release))?;
    let initramfs_path = run.dir.join("initramfs.cpio");
    let initramfs = initramfs::build(run.busybox, &modules, &script_path)?;
    fs::write(&initramfs_path, initramfs)
        .with_context(|| format!("writing {}", initramfs_path.display()))?;

    let mut qemu = qemu_command(run, &initramfs_path);
    println!("$ {}", crate::cmd::show(&qemu));
    let mut child = qemu.spawn().with_context(|| format!("starting {QEMU}"))?;
    let stdout = child.stdout.take().context("qemu's stdout")?;
    let (lines, received) = channel();
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut buffer = Vec::new();
        // Bytes, not UTF-8 lines: a guest can print anything.
        while matches!(reader.read_until(b'\n', &mut buffer), Ok(n) if n > 0) {
            let line = String::from_utf8_lossy(&buffer).trim_end().to_owned();
            buffer.clear();
            if lines.send(line).is_err() {
                break;
            }
        }
    });

    let log_path = run.dir.join("console.log");
    let mut log =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut report = Report {
        release: run.kernel.release.clone(),
        ..Report::default()
    };
    let deadline = Instant::now() + run.timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match received.recv_timeout(left) {
            Ok(line) => {
                println!("[{}] {line}", run.label);
                writeln!(log, "{line}")
                    .with_context(|| format!("writing {}", log_path.display()))?;
                report.line(&line);
            }
            Err(RecvTimeoutError::Timeout) => {
                report.problem = Some(format!(
                    "timed out after {} s; the guest was stopped",
                    run.timeout.as_secs()
                ));
                // Our own child; it is waited for below.
                let _ = child.kill();
                break;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for {QEMU}"))?;
    if !report.finished && report.problem.is_none() {
        let why = match &report.kernel_crash {
            Some(crash) => format!("the guest's kernel crashed: {crash}"),
            None => format!("the guest stopped before finishing ({status})"),
        };
        report.problem = Some(format!("{why}; see {}", log_path.display()));
    }
    Ok(report)
}

fn qemu_command(run: &Run, initramfs: &Path) -> Command {
    let mut qemu = Command::new(QEMU);
    qemu
        // KVM guests stop with "KVM internal error" on the hosts we test on;
        // software emulation is slower but works everywhere.
        .args(["-accel", "tcg", "-cpu", "max", "-smp", CPUS, "-m", MEMORY])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
        // Halt instead of rebooting, so a kernel panic ends the run.
        .arg("-no-reboot")
        // No network device: the tests use loopback and namespaces only.
        .args(["-nic", "none"])
        .arg("-kernel")
        .arg(&run.kernel.vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args([
            "-append",
            // mitigations=off: speed under emulation; nothing here is secret.
            "console=ttyS0 quiet loglevel=4 panic=-1 mitigations=off",
        ])
        .arg("-virtfs")
        .arg(format!(
            // multidevs=remap: / spans several host filesystems, whose inode
            // numbers would otherwise collide in the guest.
            "local,path=/,mount_tag={},security_model=none,readonly=on,multidevs=remap",
            initramfs::ROOT_TAG
        ))
        .args(["-device", "virtio-rng-pci"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    qemu
}

/// Stage 2, run by the host's /bin/sh as the guest's pid 1: `socktrace
/// doctor`, then each test binary as cargo would run it, between markers.
fn guest_script(run: &Run) -> String {
    let build = run.build;
    let mut script = String::from("# Stage 2 of a socktrace test guest (pid 1).\n");
    // The host's PATH and HOME find python3 and the other tools the tests run.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = match python_dir() {
        Some(dir) => format!("{}:{}", dir.display(), path.to_string_lossy()),
        None => path.to_string_lossy().into_owned(),
    };
    script.push_str(&format!("export PATH={}\n", shell_quote(&path)));
    if let Some(home) = std::env::var_os("HOME") {
        let home = shell_quote(&home.to_string_lossy());
        script.push_str(&format!("export HOME={home}\n"));
    }
    script.push_str("export SOCKTRACE_REQUIRE_ROOT_TESTS=1\n");
    for (name, value) in &run.env {
        script.push_str(&format!("export {name}={}\n", shell_quote(value)));
    }
    script.push_str("ip link set lo up\n");
    let package_dir = shell_quote(&build.package_dir.to_string_lossy());
    script.push_str(&format!("cd {package_dir}\n"));
    script.push_str("echo \"VM-BEGIN $(uname -r)\"\n");
    script.push_str("echo VM-DOCTOR-BEGIN\n");
    let socktrace = shell_quote(&build.socktrace.to_string_lossy());
    script.push_str(&format!(
        "{socktrace} doctor 2>&1\necho \"{END_DOCTOR}status=$?\"\n"
    ));
    for binary in run.suite {
        let name = &binary.name;
        let mut command = vec![shell_quote(&binary.path.to_string_lossy())];
        command.extend(["--test-threads=1", "--color=never"].map(str::to_owned));
        command.extend(binary.args.iter().map(|arg| shell_quote(arg)));
        script.push_str(&format!(
            "echo \"{BEGIN_TEST}{name}\"\n{} 2>&1\necho \"{END_TEST}{name} status=$?\"\n",
            command.join(" ")
        ));
    }
    script.push_str(&format!("echo {DONE}\n"));
    // Power off. The request runs asynchronously, and pid 1 exiting before it
    // completes would be a kernel panic, hence the sleep.
    script.push_str("echo o >/proc/sysrq-trigger\nsleep 60\n");
    script
}

/// The directory of the python3 the host runs, put first on the guest's
/// PATH: a shim in front of it (pyenv's is a shell script that runs several
/// more) costs seconds per start under emulation.
fn python_dir() -> Option<PathBuf> {
    let mut python = Command::new("python3");
    python.args(["-c", "import sys; print(sys.executable)"]);
    let executable = crate::cmd::output(&mut python)?;
    Path::new(executable.trim()).parent().map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report_of(console: &str) -> Report {
        let mut report = Report::default();
        for line in console.lines() {
            report.line(line);
        }
        report
    }

    #[test]
    fn counts_results_and_names_failures() {
        let report = report_of(
            "VM-DOCTOR-BEGIN\nok   fentry       tcp_connect, tcp_close attach\nmode: fentry\n\
             VM-DOCTOR-END status=0\n\
             VM-TEST-BEGIN cli\ntest a ... ok\n\
             test result: ok. 4 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.0s\n\
             VM-TEST-END cli status=0\n\
             VM-TEST-BEGIN trace\ntest b ... FAILED\n\
             test result: FAILED. 6 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out\n\
             VM-TEST-END trace status=101\nVM-DONE\n",
        );
        assert_eq!(report.mode.as_deref(), Some("fentry"));
        assert_eq!((report.passed, report.failed), (10, 1));
        assert_eq!(report.failures, ["trace: b"]);
        assert!(!report.ok());
    }

    #[test]
    fn a_crashed_binary_or_an_unfinished_guest_is_not_ok() {
        let crashed = report_of(
            "VM-DOCTOR-BEGIN\nmode: kprobe\nVM-DOCTOR-END status=0\n\
             VM-TEST-BEGIN modes\nVM-TEST-END modes status=139\nVM-DONE\n",
        );
        assert_eq!(crashed.failed, 1);
        assert!(!crashed.ok());
        let unfinished = report_of("VM-DOCTOR-BEGIN\nmode: fentry\nVM-DOCTOR-END status=0\n");
        assert!(!unfinished.ok());
        let passed = report_of(
            "VM-DOCTOR-BEGIN\nmode: fentry\nVM-DOCTOR-END status=0\nVM-TEST-BEGIN cli\n\
             test result: ok. 4 passed; 0 failed;\nVM-TEST-END cli status=0\nVM-DONE\n",
        );
        assert!(passed.ok());
    }

    #[test]
    fn a_guest_kernel_crash_is_kept_with_its_first_line() {
        let crashed = report_of(
            "VM-DOCTOR-BEGIN\nmode: fentry\nVM-DOCTOR-END status=0\nVM-TEST-BEGIN lifetime\n\
             test a ... [  122.825284] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n\
             [  122.829457] Kernel panic - not syncing: Fatal exception in interrupt\n",
        );
        assert_eq!(
            crashed.kernel_crash.as_deref(),
            Some("test a ... [  122.825284] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI")
        );
        assert!(!crashed.ok());
        // A test's own words are not the kernel's.
        let quoted = report_of("test oops_is_said ... ok\nOops: in a test's output\n");
        assert_eq!(quoted.kernel_crash, None);
    }

    #[test]
    fn quotes_for_sh() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
