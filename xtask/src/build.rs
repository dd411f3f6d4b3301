//! `cargo xtask build` and `cargo xtask run`.

use std::{os::unix::process::CommandExt as _, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use clap::Args;
use which::which;

use crate::{cmd, setup};

#[derive(Args)]
pub struct BuildOptions {
    /// Build the debug profile instead of release.
    #[arg(long)]
    debug: bool,
}

#[derive(Args)]
pub struct RunOptions {
    /// Arguments for socktrace, after `--`.
    #[arg(last = true)]
    args: Vec<String>,
}

/// Builds socktrace and returns the path of the binary. The kernel programs
/// are compiled and embedded by tracer-user's build script.
pub fn build(options: &BuildOptions) -> anyhow::Result<PathBuf> {
    setup::run(setup::Needs::Build)?;
    let binary = socktrace(options.debug, None)?;
    println!("built {}", binary.display());
    Ok(binary)
}

/// Builds tracer-user (the release profile unless `debug`; for `target`,
/// e.g. the static musl one, when given) and returns socktrace's path.
pub fn socktrace(debug: bool, target: Option<&str>) -> anyhow::Result<PathBuf> {
    let mut build = cmd::cargo()?;
    build.args(["build", "--package", "tracer-user"]);
    if !debug {
        build.arg("--release");
    }
    if let Some(target) = target {
        build.args(["--target", target]);
        // cc looks for x86_64-linux-musl-gcc, which Debian's musl-tools
        // calls musl-gcc.
        if target == setup::MUSL_TARGET {
            build.env("CC_x86_64_unknown_linux_musl", "musl-gcc");
        }
    }
    cmd::run(&mut build)?;
    let mut dir = cmd::target_dir()?;
    if let Some(target) = target {
        dir.push(target);
    }
    let binary = dir
        .join(if debug { "debug" } else { "release" })
        .join("socktrace");
    if !binary.is_file() {
        bail!("the build succeeded but {} is missing", binary.display());
    }
    Ok(binary)
}

/// The version a socktrace binary says it is (`socktrace 0.1.0`).
pub fn version(binary: &std::path::Path) -> anyhow::Result<String> {
    let text = cmd::output(Command::new(binary).arg("--version"))
        .with_context(|| format!("`{} --version` failed", binary.display()))?;
    text.split_whitespace()
        .nth(1)
        .map(str::to_string)
        .with_context(|| format!("`socktrace --version` said {text:?}"))
}

/// Builds socktrace, then replaces this process with it so that its exit code
/// and signals reach the caller unchanged.
pub fn run(options: &RunOptions) -> anyhow::Result<()> {
    let binary = build(&BuildOptions { debug: false })?;
    let mut socktrace = if cmd::is_root() {
        Command::new(&binary)
    } else {
        let sudo = which("sudo").context(
            "socktrace needs root (CAP_BPF and CAP_PERFMON to load its programs) \
             and sudo is not installed; run `cargo xtask run` as root",
        )?;
        println!("socktrace needs root (CAP_BPF and CAP_PERFMON); running it with sudo -E");
        let mut sudo = Command::new(sudo);
        sudo.arg("-E").arg(&binary);
        sudo
    };
    socktrace.args(&options.args);
    println!("$ {}", cmd::show(&socktrace));
    // exec only returns on failure.
    let err = socktrace.exec();
    Err(err).with_context(|| format!("running {}", binary.display()))
}
