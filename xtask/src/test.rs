//! `cargo xtask test`: formatting, lints, then unit and integration tests.

use std::process::Command;

use clap::Args;

use crate::{cmd, image, package, setup, vm};

/// Tells the root integration tests to fail, not skip, when they cannot run.
const REQUIRE_ROOT_TESTS: &str = "SOCKTRACE_REQUIRE_ROOT_TESTS";
/// Forces socktrace's attach type (`--attach`) for the second pass.
const FORCED_ATTACH: &str = "SOCKTRACE_ATTACH";
/// Tests the second pass leaves out: they measure nothing that depends on
/// the attach type, and take minutes.
const FIRST_PASS_ONLY: [&str; 1] = ["a_slow_leak_is_forecast_within_ten_minutes_and_a_pool_is_not"];

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
    test.arg("test")
        .args(HOST_PACKAGES)
        .args(&options.cargo_test_args);
    if root {
        // What tests/package.rs installs and tests/podman.rs runs.
        let deb = package::package()?;
        let image = image::image()?;
        test.env(REQUIRE_ROOT_TESTS, "1")
            .env("SOCKTRACE_DEB", deb)
            .env("SOCKTRACE_IMAGE", image);
    } else {
        println!("not root: the root integration tests will be skipped");
    }
    cmd::run(&mut test)?;
    if !root {
        println!("not root: the root integration tests were skipped; run as root to include them");
        return Ok(());
    }
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
        .args(&options.cargo_test_args)
        .env(REQUIRE_ROOT_TESTS, "1")
        .env(FORCED_ATTACH, "tracepoint");
    if !options.cargo_test_args.iter().any(|arg| arg == "--") {
        fallback.arg("--");
    }
    for test in FIRST_PASS_ONLY {
        fallback.args(["--skip", test]);
    }
    cmd::run(&mut fallback)
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
