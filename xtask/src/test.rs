//! `cargo xtask test`: formatting, lints, then unit and integration tests.

use std::{
    fs::File,
    path::PathBuf,
    process::{Child, Command},
};

use anyhow::{Context as _, bail};
use clap::Args;

use crate::{cmd, image, package, setup, vm};

/// Tells the root integration tests to fail, not skip, when they cannot run.
const REQUIRE_ROOT_TESTS: &str = "SOCKTRACE_REQUIRE_ROOT_TESTS";
/// Forces socktrace's attach type (`--attach`) for the second pass.
const FORCED_ATTACH: &str = "SOCKTRACE_ATTACH";
/// The ten-minute forecast test, (binary, test). It mostly waits (one leak
/// every 30 s), so a whole run starts it beside both passes instead of
/// spending ten minutes on it alone; the fallback pass never runs it: it
/// measures nothing that depends on the attach type.
const SLOW_FORECAST: (&str, &str) = (
    "acceptance",
    "a_slow_leak_is_forecast_within_ten_minutes_and_a_pool_is_not",
);

/// Integration test binaries the fallback pass leaves out.
const ATTACH_INDEPENDENT: [&str; 3] = ["package", "podman", "deploy"];

/// The names of tracer-user's integration test binaries (tests/*.rs).
fn integration_tests() -> anyhow::Result<Vec<String>> {
    let dir = cmd::workspace_root()?.join("tracer-user/tests");
    let mut names: Vec<String> = std::fs::read_dir(&dir)?
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".rs").map(str::to_string)
        })
        .collect();
    names.sort();
    Ok(names)
}

/// Every package but the kernel programs: they are `no_std`/`no_main` and do
/// not compile for the host ("unwinding panics are not supported without
/// std"), so they are linted for the BPF target instead.
const HOST_PACKAGES: [&str; 3] = ["--workspace", "--exclude", "tracer-ebpf"];

#[derive(Args)]
pub struct TestOptions {
    /// Run only the root integration tests, on each kernel of the VM matrix
    /// under QEMU; arguments after `--` go to the test binaries.
    #[arg(long)]
    vm: bool,
    #[command(flatten)]
    vm_options: vm::VmOptions,
    /// Arguments for `cargo test`, after `--`: a test name filter, or
    /// `-- --nocapture` for the test binaries.
    #[arg(last = true)]
    cargo_test_args: Vec<String>,
}

pub fn run(options: &TestOptions) -> anyhow::Result<()> {
    setup::run(if options.vm {
        setup::Needs::Vm
    } else {
        setup::Needs::Test
    })?;
    if options.vm {
        return vm::test_matrix(&options.vm_options, &options.cargo_test_args);
    }
    cmd::run(cmd::cargo()?.args(["fmt", "--all", "--", "--check"]))?;
    cmd::run(&mut host_clippy()?)?;
    cmd::run(&mut ebpf_clippy()?)?;

    let root = cmd::is_root();
    let mut test = cmd::cargo()?;
    test.arg("test").args(HOST_PACKAGES);
    if !root {
        println!("not root: the root integration tests will be skipped");
        cmd::run(test.args(&options.cargo_test_args))?;
        println!("not root: the root integration tests were skipped; run as root to include them");
        return Ok(());
    }
    // What tests/package.rs installs and tests/podman.rs runs.
    let deb = package::package()?;
    let image = image::image()?;
    test.env(REQUIRE_ROOT_TESTS, "1")
        .env("SOCKTRACE_DEB", deb)
        .env("SOCKTRACE_IMAGE", image);
    // A run filtered by name keeps the forecast test in the first pass,
    // where the filter decides.
    let (cargo_args, binary_args) = split_at_separator(&options.cargo_test_args);
    let slow = if cargo_args.is_empty() {
        let build = vm::build_tests(&HOST_PACKAGES)?;
        Some(Beside::start(&build, SLOW_FORECAST, binary_args)?)
    } else {
        None
    };
    let skipped_by_first: &[&str] = if slow.is_some() {
        &[SLOW_FORECAST.1]
    } else {
        &[]
    };
    let passes = cmd::run(with_skips(
        &mut test,
        &options.cargo_test_args,
        skipped_by_first,
    ))
    .and_then(|()| fallback_pass(options));
    let slow = slow.map_or(Ok(()), Beside::finish);
    passes.and(slow)
}

/// The root integration tests again with the classic-tracepoint fallback
/// forced.
fn fallback_pass(options: &TestOptions) -> anyhow::Result<()> {
    // The classic-tracepoint fallback, which older kernels run (Linux 5.10
    // natively in the VM matrix), forced here for the whole root suite.
    println!(
        "\n== the root integration tests again, with the fallback forced ({FORCED_ATTACH}=tracepoint)"
    );
    // The same packages as the first pass, so nothing is built again; the
    // tests of what is installed around socktrace (the package, the image)
    // do not depend on the attach type.
    let mut fallback = cmd::cargo()?;
    fallback.arg("test").args(HOST_PACKAGES);
    for name in integration_tests()? {
        if !ATTACH_INDEPENDENT.contains(&name.as_str()) {
            fallback.args(["--test", &name]);
        }
    }
    fallback
        .env(REQUIRE_ROOT_TESTS, "1")
        .env(FORCED_ATTACH, "tracepoint");
    cmd::run(with_skips(
        &mut fallback,
        &options.cargo_test_args,
        &[SLOW_FORECAST.1],
    ))
}

/// `cargo test` arguments split at the first `--`: cargo's own (a name
/// filter), then the test binaries'.
fn split_at_separator(args: &[String]) -> (&[String], &[String]) {
    match args.iter().position(|arg| arg == "--") {
        Some(at) => (&args[..at], &args[at + 1..]),
        None => (args, &[]),
    }
}

/// Adds the caller's `cargo test` arguments and `--skip` for each of `tests`.
fn with_skips<'a>(
    command: &'a mut Command,
    cargo_test_args: &[String],
    tests: &[&str],
) -> &'a mut Command {
    let (cargo_args, binary_args) = split_at_separator(cargo_test_args);
    command.args(cargo_args).arg("--").args(binary_args);
    for test in tests {
        command.args(["--skip", test]);
    }
    command
}

/// One test run by its binary beside the passes, its output kept for the
/// end so that it does not interleave with theirs.
struct Beside {
    child: Child,
    binary: String,
    log: PathBuf,
}

impl Beside {
    fn start(
        build: &vm::TestBuild,
        (binary, test): (&str, &str),
        binary_args: &[String],
    ) -> anyhow::Result<Self> {
        let path = build
            .binaries
            .iter()
            .find(|(name, _)| name == binary)
            .map(|(_, path)| path)
            .with_context(|| format!("cargo built no test binary `{binary}`"))?;
        let log = cmd::target_dir()?.join(format!("beside-{test}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = Command::new(path);
        command
            .args([test, "--exact"])
            .args(binary_args)
            .current_dir(&build.package_dir)
            .env(REQUIRE_ROOT_TESTS, "1")
            .stdout(out.try_clone()?)
            .stderr(out);
        println!(
            "\n== {binary}::{test} runs beside the passes; its output follows them\n$ {}",
            cmd::show(&command)
        );
        let child = command
            .spawn()
            .with_context(|| format!("starting `{}`", cmd::show(&command)))?;
        Ok(Self {
            child,
            binary: binary.to_owned(),
            log,
        })
    }

    /// Waits for the test, then prints its output as cargo would have.
    fn finish(mut self) -> anyhow::Result<()> {
        let status = self.child.wait()?;
        let output = std::fs::read_to_string(&self.log)
            .with_context(|| format!("reading {}", self.log.display()))?;
        println!(
            "\n     Running tests/{}.rs (beside the passes)",
            self.binary
        );
        print!("{output}");
        if !status.success() {
            bail!("the test run beside the passes failed ({status})");
        }
        Ok(())
    }
}

impl Drop for Beside {
    /// An error that ends xtask early takes the test with it.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn host_clippy() -> anyhow::Result<Command> {
    let mut clippy = cmd::cargo()?;
    clippy
        .args(["clippy", "--all-targets"])
        .args(HOST_PACKAGES)
        .args(["--", "-D", "warnings"]);
    Ok(clippy)
}

/// Lints the kernel programs for the BPF target they are really built for.
fn ebpf_clippy() -> anyhow::Result<Command> {
    let mut clippy = cmd::cargo()?;
    clippy
        .args(["+nightly", "clippy", "--package", "tracer-ebpf"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--", "-D", "warnings"]);
    Ok(clippy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(command: &Command) -> Vec<String> {
        command
            .get_args()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn skips_go_to_the_test_binaries_after_the_callers_arguments() {
        let given = ["lifetime", "--", "--show-output"].map(String::from);
        let mut command = Command::new("cargo");
        with_skips(&mut command, &given, &["slow"]);
        assert_eq!(
            args(&command),
            ["lifetime", "--", "--show-output", "--skip", "slow"]
        );

        let mut command = Command::new("cargo");
        with_skips(&mut command, &[], &[]);
        assert_eq!(args(&command), ["--"]);
    }

    #[test]
    fn a_name_filter_is_what_comes_before_the_separator() {
        let given = ["--", "--show-output"].map(String::from);
        let (cargo_args, binary_args) = split_at_separator(&given);
        assert!(cargo_args.is_empty());
        assert_eq!(binary_args, ["--show-output"]);
        let given = ["watch".to_owned()];
        assert_eq!(split_at_separator(&given), (&given[..], &[][..]));
    }
}
