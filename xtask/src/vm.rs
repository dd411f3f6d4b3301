//! `cargo xtask test --vm`: the root integration tests on stock Debian kernels
//! under QEMU, so that the probe modes this host may lack (fentry, kprobe) are
//! tested where they exist.
//!
//! The guest shares the host's root filesystem read-only over 9p, under a
//! tmpfs overlay. The test binaries, socktrace and python3 therefore run at
//! the paths they were built for, with the host's libraries; only the kernel
//! changes. Kernels and busybox come from Debian packages, fetched with
//! apt-get and cached under `target/vm/cache`.

mod debian;
mod guest;
mod initramfs;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Args;
use serde_json::Value;
use which::which;

use crate::cmd;

/// Names the probe modes a guest kernel must support, richest first; the
/// first is the one `auto` must choose. Read by `tracer-user/tests/modes.rs`.
const EXPECT_MODES: &str = "SOCKTRACE_EXPECT_MODES";
/// The attach type `auto` must choose there (same reader).
const EXPECT_ATTACH: &str = "SOCKTRACE_EXPECT_ATTACH";

/// One kernel of the matrix.
struct KernelSpec {
    /// What reports and `--kernel` call it: the kernel series.
    name: &'static str,
    /// The Debian meta-package that depends on the newest kernel of the series.
    meta_package: &'static str,
    /// Probe modes socktrace must find usable there, richest first.
    modes: &'static [&'static str],
    /// The attach type `auto` must choose there.
    attach: &'static str,
    /// The Debian release it comes from, when not the host's own.
    release: Option<&'static str>,
    /// When not the whole suite: the test binaries run there, and why.
    only: Option<(&'static [&'static str], &'static str)>,
}

/// Stock Debian kernels. All have kprobes, BTF and fentry (ftrace direct
/// calls), and no lockdown when booted without Secure Boot; bullseye's 5.10
/// predates socket storage in tracing programs (5.11), so it runs the
/// classic-tracepoint fallback.
const MATRIX: [KernelSpec; 3] = [
    KernelSpec {
        name: "5.10",
        meta_package: "linux-image-amd64",
        modes: &["fentry", "kprobe", "tracepoint"],
        attach: "tracepoint",
        release: Some("bullseye"),
        only: None,
    },
    KernelSpec {
        name: "6.1",
        meta_package: "linux-image-amd64",
        modes: &["fentry", "kprobe", "tracepoint"],
        attach: "tp_btf",
        release: None,
        only: None,
    },
    // Debian's newer kernel for bookworm, from bookworm-security.
    KernelSpec {
        name: "6.12",
        meta_package: "linux-image-6.12-amd64",
        modes: &["fentry", "kprobe", "tracepoint"],
        attach: "tp_btf",
        release: None,
        // Under emulation on a slow host the whole suite takes 13 minutes
        // a kernel, and CI has 90 in all.
        only: Some((
            &["modes", "lifetime", "losses", "trace"],
            "6.1 runs the whole suite with the same probe mode and attach type",
        )),
    },
];

/// Test binaries the guests leave out: they test nothing that depends on the
/// kernel, the native run covers them, and emulation makes them slow.
const HOST_ONLY_BINARIES: [(&str, &str); 4] = [
    (
        "serve",
        "the Prometheus endpoint; runs Prometheus itself, minutes under emulation",
    ),
    ("package", "installs the Debian package on the host"),
    ("podman", "runs containers with podman on the host"),
    ("deploy", "checks manifests, whatever the kernel"),
];

/// Single tests the guests skip: (binary, test, why).
const HOST_ONLY_TESTS: [(&str, &str, &str); 2] = [
    (
        "watch",
        "high_churn_with_prompt_closes_is_healthy",
        "asserts a connection rate that emulation cannot reach",
    ),
    (
        "acceptance",
        "a_slow_leak_is_forecast_within_ten_minutes_and_a_pool_is_not",
        "ten minutes of wall-clock time for a forecast that does not depend on the kernel",
    ),
];

/// A guest under TCG is far slower than the host; the per-guest timeout
/// (`--vm-timeout`) bounds each run.
const DEFAULT_TIMEOUT_SECS: u64 = 1200;

#[derive(Args)]
pub struct VmOptions {
    /// With --vm: only this kernel of the matrix (repeatable): 5.10, 6.1, 6.12.
    #[arg(long = "kernel", value_name = "SERIES", requires = "vm")]
    kernels: Vec<String>,
    /// With --vm: give up on a guest after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_TIMEOUT_SECS, requires = "vm")]
    vm_timeout: u64,
}

/// What the guests run: socktrace and the integration test binaries.
pub struct TestBuild {
    pub socktrace: PathBuf,
    /// (name, executable) of each `tracer-user/tests/*.rs` binary.
    pub binaries: Vec<(String, PathBuf)>,
    /// tracer-user's directory: cargo runs its tests from there.
    pub package_dir: PathBuf,
}

/// A test binary as a guest runs it.
pub struct SuiteBinary {
    pub name: String,
    pub path: PathBuf,
    /// libtest arguments: the skips and the caller's own.
    pub args: Vec<String>,
}

/// How one kernel of the matrix fared.
enum Outcome {
    Skipped(String),
    Ran(guest::Report),
}

/// Boots each kernel of the matrix and runs the root integration tests in it.
/// `test_args` go to every test binary (a name filter, `--nocapture`, ...).
pub fn test_matrix(options: &VmOptions, test_args: &[String]) -> anyhow::Result<()> {
    let specs = selected(&options.kernels)?;
    if !cmd::is_root() {
        bail!("the VM matrix needs root: apt-get fetches the kernels and the guests share /");
    }
    for tool in [guest::QEMU, "dpkg-deb", "apt-get"] {
        which(tool).with_context(|| format!("`{tool}` is missing; run `cargo xtask setup`"))?;
    }
    let build = build_tests(&["--release", "--package", "tracer-user"])?;
    let suite = guest_suite(&build, test_args);
    let work = cmd::target_dir()?.join("vm");
    let mut apt = debian::Apt::new(work.join("cache"))?;
    let busybox = apt
        .unpacked("busybox-static")
        .context("fetching busybox-static for the guests' initramfs")?
        .join("bin/busybox");

    let mut results = Vec::new();
    for spec in specs {
        println!("\n== kernel {} ({})", spec.name, spec.meta_package);
        let started = Instant::now();
        let kernel = match spec.release {
            Some(release) => debian::Apt::release(
                work.join("cache"),
                &work.join(format!("apt-{release}")),
                release,
            )
            .and_then(|mut other| other.kernel(spec.meta_package, spec.name)),
            None => apt.kernel(spec.meta_package, spec.name),
        };
        let outcome = match kernel {
            Err(err) => {
                println!("kernel {}: skipped: {err:#}", spec.name);
                Outcome::Skipped(format!("{err:#}"))
            }
            Ok(kernel) => {
                let suite = kernel_suite(spec, &suite);
                let run = guest::Run {
                    label: spec.name,
                    kernel: &kernel,
                    busybox: &busybox,
                    build: &build,
                    suite: &suite,
                    env: vec![
                        (EXPECT_MODES, spec.modes.join(",")),
                        (EXPECT_ATTACH, spec.attach.to_owned()),
                    ],
                    dir: work.join(spec.name),
                    timeout: Duration::from_secs(options.vm_timeout),
                };
                let mut report = guest::boot(&run)?;
                // Emulated guests' kernels have crashed in their own code
                // patching (an int3 left by text_poke while a tracepoint was
                // enabled, under TCG): one crash earns a second boot, said in
                // the summary; a second fails the kernel. Not when a test
                // had failed before the crash: a second boot would hide it.
                let retry = !report.ok() && report.failed == 0;
                if let Some(crash) = report.kernel_crash.clone().filter(|_| retry) {
                    println!(
                        "kernel {}: the guest's kernel crashed ({crash}); booting it once more",
                        spec.name
                    );
                    report = guest::boot(&run)?;
                    report.crashed_before = Some(crash);
                }
                Outcome::Ran(report)
            }
        };
        results.push((spec, outcome, started.elapsed()));
    }
    summarize(&results)
}

/// The part of the guests' suite one kernel runs; says what it leaves out.
fn kernel_suite<'a>(spec: &KernelSpec, suite: &'a [SuiteBinary]) -> Vec<&'a SuiteBinary> {
    let Some((names, why)) = spec.only else {
        return suite.iter().collect();
    };
    let (kept, left): (Vec<_>, Vec<_>) = suite
        .iter()
        .partition(|binary| names.contains(&binary.name.as_str()));
    if !left.is_empty() {
        let left: Vec<_> = left.iter().map(|binary| binary.name.as_str()).collect();
        println!("kernel {} leaves out {}: {why}", spec.name, left.join(", "));
    }
    kept
}

/// The binaries the guests run, less what only the host needs to run; says
/// what is left out and why.
fn guest_suite(build: &TestBuild, test_args: &[String]) -> Vec<SuiteBinary> {
    let mut suite = Vec::new();
    for (name, path) in &build.binaries {
        if let Some((_, why)) = HOST_ONLY_BINARIES.iter().find(|(n, _)| n == name) {
            println!("guests leave out {name}: {why} (the native run covers it)");
            continue;
        }
        let mut args = Vec::new();
        for (_, test, why) in HOST_ONLY_TESTS.iter().filter(|(n, ..)| n == name) {
            println!("guests skip {name}::{test}: {why} (the native run covers it)");
            args.extend(["--skip".to_owned(), (*test).to_owned()]);
        }
        args.extend(test_args.iter().cloned());
        suite.push(SuiteBinary {
            name: name.clone(),
            path: path.clone(),
            args,
        });
    }
    suite
}

fn selected(names: &[String]) -> anyhow::Result<Vec<&'static KernelSpec>> {
    if names.is_empty() {
        return Ok(MATRIX.iter().collect());
    }
    names
        .iter()
        .map(|name| {
            MATRIX
                .iter()
                .find(|spec| spec.name == name)
                .with_context(|| {
                    let known: Vec<_> = MATRIX.iter().map(|spec| spec.name).collect();
                    format!(
                        "no kernel {name} in the matrix (known: {})",
                        known.join(", ")
                    )
                })
        })
        .collect()
}

/// Builds socktrace and the integration tests once, and lists them from
/// cargo's JSON messages. `cargo_args` choose the packages and profile; the
/// guests take them optimized: under emulation a debug socktrace spends most
/// of a test parsing BTF.
pub fn build_tests(cargo_args: &[&str]) -> anyhow::Result<TestBuild> {
    let mut cargo = cmd::cargo()?;
    cargo
        .arg("test")
        .args(cargo_args)
        .args(["--tests", "--no-run"])
        .arg("--message-format=json-render-diagnostics")
        .stderr(Stdio::inherit());
    println!("$ {}", cmd::show(&cargo));
    let out = cargo
        .output()
        .with_context(|| format!("starting `{}`", cmd::show(&cargo)))?;
    if !out.status.success() {
        bail!("`{}` failed ({})", cmd::show(&cargo), out.status);
    }
    parse_test_build(&String::from_utf8_lossy(&out.stdout))
}

fn parse_test_build(messages: &str) -> anyhow::Result<TestBuild> {
    let mut socktrace = None;
    let mut binaries = Vec::new();
    let mut package_dir = None;
    for line in messages.lines() {
        let Ok(message) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(executable) = message["executable"].as_str() else {
            continue;
        };
        let target = &message["target"];
        let name = target["name"].as_str().unwrap_or_default();
        let kinds = target["kind"].as_array().cloned().unwrap_or_default();
        let is_test_build = message["profile"]["test"] == true;
        if kinds.iter().any(|kind| kind == "test") {
            binaries.push((name.to_owned(), PathBuf::from(executable)));
            if let Some(src) = target["src_path"].as_str() {
                // <package>/tests/<name>.rs
                package_dir = Path::new(src)
                    .parent()
                    .and_then(Path::parent)
                    .map(Path::to_path_buf);
            }
        } else if name == "socktrace" && !is_test_build {
            socktrace = Some(PathBuf::from(executable));
        }
    }
    binaries.sort();
    if binaries.is_empty() {
        bail!("cargo built no integration test binaries for tracer-user");
    }
    Ok(TestBuild {
        socktrace: socktrace.context("cargo did not report the socktrace binary")?,
        binaries,
        package_dir: package_dir.context("cargo did not report where the tests live")?,
    })
}

/// Prints one line per kernel and fails unless every kernel that ran passed
/// and at least one ran.
fn summarize(results: &[(&KernelSpec, Outcome, Duration)]) -> anyhow::Result<()> {
    println!("\n== VM matrix");
    let mut ran = 0;
    let mut bad = Vec::new();
    for (spec, outcome, elapsed) in results {
        let took = elapsed.as_secs();
        match outcome {
            Outcome::Skipped(reason) => {
                println!("kernel {:<5} skipped: {reason}", spec.name);
            }
            Outcome::Ran(report) => {
                ran += 1;
                println!(
                    "kernel {:<5} {}: mode {}, attach {}, {} passed, {} failed, {took} s{}",
                    spec.name,
                    report.release,
                    report.mode.as_deref().unwrap_or("none (doctor failed)"),
                    report.attach.as_deref().unwrap_or("none"),
                    report.passed,
                    report.failed,
                    report
                        .problem
                        .as_ref()
                        .map(|p| format!(" ({p})"))
                        .unwrap_or_default(),
                );
                if let Some(crash) = &report.crashed_before {
                    println!("    a second boot: the first one's kernel crashed: {crash}");
                }
                for failure in &report.failures {
                    println!("    failed: {failure}");
                }
                if !report.ok() {
                    bad.push(spec.name);
                }
            }
        }
    }
    if !bad.is_empty() {
        bail!("the integration tests failed on kernel {}", bad.join(", "));
    }
    if ran == 0 {
        bail!("no kernel of the VM matrix could be tested");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_the_integration_test_binaries() {
        let messages = r#"{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"socktrace","src_path":"/w/tracer-user/src/main.rs"},"profile":{"test":false},"executable":"/w/target/debug/socktrace"}
{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"socktrace","src_path":"/w/tracer-user/src/main.rs"},"profile":{"test":true},"executable":"/w/target/debug/deps/socktrace-1"}
{"reason":"compiler-artifact","target":{"kind":["test"],"name":"trace","src_path":"/w/tracer-user/tests/trace.rs"},"profile":{"test":true},"executable":"/w/target/debug/deps/trace-2"}
{"reason":"compiler-artifact","target":{"kind":["test"],"name":"cli","src_path":"/w/tracer-user/tests/cli.rs"},"profile":{"test":true},"executable":"/w/target/debug/deps/cli-3"}
{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"libc"},"profile":{"test":false},"executable":null}
{"reason":"build-finished","success":true}"#;
        let build = parse_test_build(messages).unwrap();
        assert_eq!(build.socktrace, Path::new("/w/target/debug/socktrace"));
        assert_eq!(build.package_dir, Path::new("/w/tracer-user"));
        let names: Vec<_> = build.binaries.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["cli", "trace"]);
    }

    #[test]
    fn guests_leave_out_host_only_tests() {
        let build = TestBuild {
            socktrace: "/t/socktrace".into(),
            binaries: vec![
                ("serve".into(), "/t/serve-1".into()),
                ("watch".into(), "/t/watch-2".into()),
            ],
            package_dir: "/w/tracer-user".into(),
        };
        let suite = guest_suite(&build, &["--nocapture".into()]);
        assert_eq!(suite.len(), 1);
        assert_eq!(suite[0].name, "watch");
        assert_eq!(
            suite[0].args,
            [
                "--skip",
                "high_churn_with_prompt_closes_is_healthy",
                "--nocapture"
            ]
        );
    }

    #[test]
    fn a_kernel_may_run_part_of_the_suite() {
        let binary = |name: &str| SuiteBinary {
            name: name.to_owned(),
            path: format!("/t/{name}").into(),
            args: Vec::new(),
        };
        let suite = [binary("lifetime"), binary("watch")];
        let names = |spec: &KernelSpec| -> Vec<String> {
            kernel_suite(spec, &suite)
                .iter()
                .map(|binary| binary.name.clone())
                .collect()
        };
        assert_eq!(names(&MATRIX[1]), ["lifetime", "watch"]);
        assert_eq!(names(&MATRIX[2]), ["lifetime"]);
    }

    #[test]
    fn kernels_are_chosen_by_series() {
        assert_eq!(selected(&[]).unwrap().len(), MATRIX.len());
        assert_eq!(selected(&["6.12".into()]).unwrap()[0].name, "6.12");
        assert_eq!(
            selected(&["5.10".into()]).unwrap()[0].release,
            Some("bullseye")
        );
        assert!(selected(&["4.19".into()]).is_err());
    }
}
