//! `cargo xtask setup`: installs what building and testing socktrace needs.
//!
//! Every step checks first and prints one line, so a second run is quick and
//! says what is there.

use std::process::Command;

use anyhow::{Context as _, bail};
use which::which;

use crate::cmd::{self, is_root};

/// bpf-linker links the LLVM bitcode that rustc emits, so its LLVM major must
/// match the nightly's. These names change together when nightly moves on.
const LLVM_MAJOR: &str = "22";
const LLVM_DEV_PACKAGE: &str = "llvm-22-dev";
const LLVM_BIN_DIR: &str = "/usr/lib/llvm-22/bin";
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";
/// The release known to build against LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// A command the tests need and the Debian package that provides it.
struct Tool {
    command: &'static str,
    package: &'static str,
    why: &'static str,
}

/// Everything the tests run besides cargo. Add new test tools here.
fn test_tools() -> &'static [Tool] {
    &[
        Tool {
            command: "python3",
            package: "python3",
            why: "peer processes in the integration tests",
        },
        Tool {
            command: "unshare",
            package: "util-linux",
            why: "running test processes in their own PID and network namespaces",
        },
        Tool {
            command: "nsenter",
            package: "util-linux",
            why: "entering the test namespaces",
        },
        Tool {
            command: "ip",
            package: "iproute2",
            why: "setting up network namespaces",
        },
        Tool {
            command: "go",
            package: "golang-go",
            why: "building the Go HTTP heartbeat of the incident the tests replay",
        },
        Tool {
            command: "tcpstates",
            package: "libbpf-tools",
            why: "a peer tracer that `cargo xtask bench` compares with",
        },
        Tool {
            command: "tcplife",
            package: "libbpf-tools",
            why: "a peer tracer that `cargo xtask bench` compares with",
        },
        Tool {
            command: "bpftrace",
            package: "bpftrace",
            why: "a BPF program that spins beside socktrace's in the tests of skipped runs",
        },
        Tool {
            command: "prometheus",
            package: "prometheus",
            why: "the server that scrapes `socktrace serve` in its integration tests",
        },
        Tool {
            command: "promtool",
            package: "prometheus",
            why: "checking the metrics and the alert rules under deploy/prometheus",
        },
        Tool {
            command: "pip3",
            package: "python3-pip",
            why: "installing the Python modules the tests import",
        },
        Tool {
            command: "qemu-system-x86_64",
            package: "qemu-system-x86",
            why: "booting other kernels in `cargo xtask test --vm`",
        },
        Tool {
            command: "xz",
            package: "xz-utils",
            why: "unpacking compressed kernel modules for `cargo xtask test --vm`",
        },
    ]
}

pub fn run() -> anyhow::Result<()> {
    let mut apt = Apt::default();
    nightly_toolchain()?;
    rust_src()?;
    llvm_dev(&mut apt)?;
    bpf_linker()?;
    tools(&mut apt)?;
    python_modules()
}

/// Python modules the tests import: (module, PyPI package, why).
const PYTHON_MODULES: &[(&str, &str, &str)] = &[(
    "hdrh",
    "hdrhistogram",
    "reading `socktrace serve --hdr-log` files back in its tests",
)];

fn python_modules() -> anyhow::Result<()> {
    for &(module, package, why) in PYTHON_MODULES {
        let mut import = Command::new("python3");
        import.args(["-c", &format!("import {module}")]);
        if cmd::output(&mut import).is_some() {
            println!("python module {module} present");
            continue;
        }
        println!("installing {package} from PyPI (needed for {why})...");
        // Debian's python3 refuses pip installs outside a venv (PEP 668)
        // unless told; the tests run the system python3.
        let mut install = Command::new("python3");
        install.args(["-m", "pip", "install", "--quiet", "--break-system-packages"]);
        if !is_root() {
            install.arg("--user");
        }
        cmd::run(install.arg(package))?;
    }
    Ok(())
}

fn nightly_toolchain() -> anyhow::Result<()> {
    if !has_nightly() {
        println!("installing the nightly toolchain (needed to build the kernel programs)...");
        let mut install = Command::new("rustup");
        install.args(["toolchain", "install", "nightly", "--profile", "minimal"]);
        cmd::run(&mut install).context(
            "the nightly toolchain is missing and could not be installed; \
             install it with `rustup toolchain install nightly --profile minimal`",
        )?;
    }
    match nightly_llvm_version() {
        Some(version) if version.split('.').next() == Some(LLVM_MAJOR) => {
            println!("nightly toolchain present (LLVM {version})");
        }
        Some(version) => println!(
            "warning: nightly uses LLVM {version} but bpf-linker is built for LLVM {LLVM_MAJOR}; \
             the eBPF build may fail until xtask/src/setup.rs is updated"
        ),
        None => bail!("the nightly toolchain is installed but `rustc +nightly -vV` fails"),
    }
    Ok(())
}

/// True for the plain `nightly` channel, which aya-build uses; dated
/// nightlies (`nightly-2026-05-19-…`) do not count.
fn has_nightly() -> bool {
    let Some(list) = cmd::output(Command::new("rustup").args(["toolchain", "list"])) else {
        return false;
    };
    list.lines()
        .filter_map(|line| line.split_whitespace().next())
        .any(|name| match name.strip_prefix("nightly-") {
            Some(rest) => !rest.starts_with(|c: char| c.is_ascii_digit()),
            None => name == "nightly",
        })
}

fn nightly_llvm_version() -> Option<String> {
    let verbose = cmd::output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    verbose
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .map(|version| version.trim().to_owned())
}

/// `-Z build-std=core` compiles core from source for the BPF target.
fn rust_src() -> anyhow::Result<()> {
    let mut list = Command::new("rustup");
    list.args(["component", "list", "--toolchain", "nightly", "--installed"]);
    let installed = cmd::output(&mut list).unwrap_or_default();
    if installed.lines().any(|line| line.starts_with("rust-src")) {
        println!("rust-src (nightly) present");
        return Ok(());
    }
    println!("installing rust-src for nightly (needed by -Z build-std=core)...");
    cmd::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

/// bpf-linker is built against it, and links to its libLLVM at run time.
fn llvm_dev(apt: &mut Apt) -> anyhow::Result<()> {
    if deb_installed(LLVM_DEV_PACKAGE) {
        println!("{LLVM_DEV_PACKAGE} present");
        return Ok(());
    }
    println!("installing {LLVM_DEV_PACKAGE} (needed to build bpf-linker)...");
    apt.install(&[LLVM_DEV_PACKAGE])
}

fn bpf_linker() -> anyhow::Result<()> {
    if let Some(version) = bpf_linker_version() {
        println!("{version} present");
        return Ok(());
    }
    println!(
        "installing bpf-linker {BPF_LINKER_VERSION} for LLVM {LLVM_MAJOR} \
         (needed to link the kernel programs; takes a minute or two)..."
    );
    let mut install = Command::new("cargo");
    install
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args([
            "--no-default-features",
            "--features",
            BPF_LINKER_LLVM_FEATURE,
        ])
        // Its build finds LLVM through llvm-config.
        .env("PATH", cmd::path_with(LLVM_BIN_DIR.as_ref())?);
    cmd::run(&mut install)?;
    match bpf_linker_version() {
        Some(version) => println!("{version} installed"),
        None => bail!("bpf-linker was installed but is not on PATH"),
    }
    Ok(())
}

/// `bpf-linker --version` prints e.g. "bpf-linker 0.13.0".
fn bpf_linker_version() -> Option<String> {
    let linker = which("bpf-linker").ok()?;
    let version = cmd::output(Command::new(linker).arg("--version"))?;
    Some(version.trim().to_owned())
}

fn tools(apt: &mut Apt) -> anyhow::Result<()> {
    let (present, missing): (Vec<&Tool>, Vec<&Tool>) = test_tools()
        .iter()
        .partition(|tool| which(tool.command).is_ok());
    for tool in &present {
        println!("{} present", tool.command);
    }
    if missing.is_empty() {
        return Ok(());
    }
    let mut packages: Vec<&str> = Vec::new();
    for tool in &missing {
        println!(
            "installing {} (needed for {}: {})...",
            tool.package, tool.command, tool.why
        );
        if !packages.contains(&tool.package) {
            packages.push(tool.package);
        }
    }
    apt.install(&packages)?;
    for tool in &missing {
        which(tool.command).with_context(|| {
            format!(
                "{} installed but `{}` is not on PATH",
                tool.package, tool.command
            )
        })?;
    }
    Ok(())
}

fn deb_installed(package: &str) -> bool {
    let mut query = Command::new("dpkg-query");
    query.args(["-W", "-f=${Status}", package]);
    cmd::output(&mut query).is_some_and(|status| status.trim() == "install ok installed")
}

/// apt-get, refreshing the package lists once per run: a fresh machine has
/// none, and llvm-22-dev comes from bookworm-security.
#[derive(Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn install(&mut self, packages: &[&str]) -> anyhow::Result<()> {
        let names = packages.join(" ");
        if !is_root() {
            bail!(
                "installing {names} needs root: run `cargo xtask setup` as root, \
                 or `sudo apt-get install -y {names}` first"
            );
        }
        if !self.updated {
            cmd::run(Command::new("apt-get").arg("update"))?;
            self.updated = true;
        }
        let mut install = Command::new("apt-get");
        install
            .args(["install", "-y"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive");
        cmd::run(&mut install)
    }
}
