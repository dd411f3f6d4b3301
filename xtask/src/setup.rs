//! `cargo xtask setup`: installs what a job needs, and only that: building
//! (`build`, `run`) needs the nightly `rust-src`, `llvm-22-dev` and
//! `bpf-linker`; the tests, the benchmark and the VM matrix add their own
//! tools. Nothing the run path installs starts a service.
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

/// What a job needs installed beyond what building needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Needs {
    /// `cargo xtask build` and `run`: the toolchain pieces only.
    Build,
    /// `cargo xtask test`: the tools the integration tests drive, and what
    /// the package and the image they install need.
    Test,
    /// `cargo xtask bench`: the peer tracers it compares with.
    Bench,
    /// `cargo xtask package`: cargo-deb.
    Package,
    /// `cargo xtask image`: the static musl target and podman.
    Image,
    /// `cargo xtask test --vm`: QEMU, and the test tools the guests use.
    Vm,
    /// `cargo xtask fuzz`: cargo-fuzz.
    Fuzz,
    /// Everything (`cargo xtask setup` without `--for`).
    All,
}

/// A command a job needs and the Debian package that provides it.
struct Tool {
    command: &'static str,
    package: &'static str,
    why: &'static str,
    needed_by: Needed,
}

/// The jobs a tool is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Needed {
    /// The tests, and so the VM guests that run them.
    Tests,
    Bench,
    Vm,
    /// Building and running the image (and so its tests on the host).
    Image,
}

impl Needs {
    fn wants(self, tool: &Tool) -> bool {
        match (self, tool.needed_by) {
            (Self::All, _) => true,
            (Self::Build | Self::Package | Self::Fuzz, _) => false,
            (Self::Test, needed) => needed == Needed::Tests || needed == Needed::Image,
            (Self::Bench, needed) => needed == Needed::Bench,
            (Self::Image, needed) => needed == Needed::Image,
            (Self::Vm, needed) => needed == Needed::Tests || needed == Needed::Vm,
        }
    }

    fn package(self) -> bool {
        matches!(self, Self::Package | Self::Test | Self::All)
    }

    fn image(self) -> bool {
        matches!(self, Self::Image | Self::Test | Self::All)
    }

    fn python(self) -> bool {
        matches!(self, Self::Test | Self::Vm | Self::All)
    }
}

/// Everything the jobs run besides cargo. Add new tools here.
fn tools_of_jobs() -> &'static [Tool] {
    &[
        Tool {
            command: "python3",
            package: "python3",
            why: "peer processes in the integration tests",
            needed_by: Needed::Tests,
        },
        Tool {
            command: "unshare",
            package: "util-linux",
            why: "running test processes in their own PID and network namespaces",
            needed_by: Needed::Tests,
        },
        Tool {
            command: "nsenter",
            package: "util-linux",
            why: "entering the test namespaces",
            needed_by: Needed::Tests,
        },
        Tool {
            command: "ip",
            package: "iproute2",
            why: "setting up network namespaces",
            needed_by: Needed::Tests,
        },
        Tool {
            command: "go",
            package: "golang-go",
            why: "building the Go HTTP heartbeat of the incident the tests replay",
            needed_by: Needed::Tests,
        },
        Tool {
            command: "tcpstates",
            package: "libbpf-tools",
            why: "a peer tracer that `cargo xtask bench` compares with",
            needed_by: Needed::Bench,
        },
        Tool {
            command: "tcplife",
            package: "libbpf-tools",
            why: "a peer tracer that `cargo xtask bench` compares with",
            needed_by: Needed::Bench,
        },
        Tool {
            command: "bpftrace",
            package: "bpftrace",
            why: "a BPF program that spins beside socktrace's in the tests of skipped runs",
            needed_by: Needed::Tests,
        },
        Tool {
            command: "prometheus",
            package: "prometheus",
            why: "the server that scrapes `socktrace serve` in its integration tests",
            needed_by: Needed::Tests,
        },
        Tool {
            command: "promtool",
            package: "prometheus",
            why: "checking the metrics and the alert rules under deploy/prometheus",
            needed_by: Needed::Tests,
        },
        Tool {
            command: "openssl",
            package: "openssl",
            why: "certificates for the test of `serve --web-config` over TLS",
            needed_by: Needed::Tests,
        },
        Tool {
            command: "curl",
            package: "curl",
            why: "the clients that `serve --web-config` must refuse, in its test",
            needed_by: Needed::Tests,
        },
        Tool {
            command: "pip3",
            package: "python3-pip",
            why: "installing the Python modules the tests import",
            needed_by: Needed::Tests,
        },
        Tool {
            command: "man",
            package: "man-db",
            why: "checking that the Debian package's man page renders",
            needed_by: Needed::Tests,
        },
        Tool {
            command: "podman",
            package: "podman",
            why: "building the container image, and the tests with a real container runtime",
            needed_by: Needed::Image,
        },
        Tool {
            command: "musl-gcc",
            package: "musl-tools",
            why: "compiling ring's C and assembly (TLS for --web-config) into the static binary",
            needed_by: Needed::Image,
        },
        Tool {
            command: "runc",
            package: "runc",
            why: "podman's runtime here (crun refuses this machine's hybrid cgroups)",
            needed_by: Needed::Image,
        },
        Tool {
            command: "qemu-system-x86_64",
            package: "qemu-system-x86",
            why: "booting other kernels in `cargo xtask test --vm`",
            needed_by: Needed::Vm,
        },
        Tool {
            command: "xz",
            package: "xz-utils",
            why: "unpacking compressed kernel modules for `cargo xtask test --vm`",
            needed_by: Needed::Vm,
        },
    ]
}

/// Installs what building needs, then what `needs` adds.
pub fn run(needs: Needs) -> anyhow::Result<()> {
    let mut apt = Apt::default();
    nightly_toolchain()?;
    rust_src()?;
    llvm_dev(&mut apt)?;
    bpf_linker()?;
    if needs == Needs::Build {
        return Ok(());
    }
    tools(&mut apt, needs)?;
    if needs.package() {
        cargo_deb()?;
    }
    if needs.image() {
        musl_target()?;
    }
    if needs.python() {
        python_modules()?;
    }
    if matches!(needs, Needs::Fuzz | Needs::All) {
        cargo_fuzz()?;
    }
    Ok(())
}

/// The release known to build with the stable toolchain here.
const CARGO_DEB_VERSION: &str = "3.8.0";

fn cargo_deb() -> anyhow::Result<()> {
    cargo_tool(
        "deb",
        CARGO_DEB_VERSION,
        "needed to build the Debian package; takes a minute or two",
    )
}

/// The release known to build with the stable toolchain here.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

fn cargo_fuzz() -> anyhow::Result<()> {
    cargo_tool(
        "fuzz",
        CARGO_FUZZ_VERSION,
        "runs the fuzz targets; takes a minute",
    )
}

/// `cargo SUBCOMMAND` from crates.io (`cargo-SUBCOMMAND` at `version`),
/// unless it is there already.
fn cargo_tool(subcommand: &str, version: &str, why: &str) -> anyhow::Result<()> {
    let package = format!("cargo-{subcommand}");
    let mut present = Command::new("cargo");
    present.args([subcommand, "--version"]);
    if let Some(found) = cmd::output(&mut present) {
        println!("{package} present ({})", found.trim());
        return Ok(());
    }
    println!("installing {package} {version} ({why})...");
    let mut install = Command::new("cargo");
    install.args(["install", &package, "--locked", "--version", version]);
    cmd::run(&mut install)
}

/// The static binary of the container image.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

fn musl_target() -> anyhow::Result<()> {
    let mut list = Command::new("rustup");
    list.args(["target", "list", "--installed"]);
    let installed = cmd::output(&mut list).unwrap_or_default();
    if installed.lines().any(|line| line.trim() == MUSL_TARGET) {
        println!("{MUSL_TARGET} target present");
        return Ok(());
    }
    println!("installing the {MUSL_TARGET} target (needed for the image's static binary)...");
    cmd::run(Command::new("rustup").args(["target", "add", MUSL_TARGET]))
}

/// Python modules the tests import: (module, PyPI package, why).
const PYTHON_MODULES: &[(&str, &str, &str)] = &[
    (
        "hdrh",
        "hdrhistogram",
        "reading `socktrace serve --hdr-log` files back in its tests",
    ),
    (
        "kubernetes_validate",
        "kubernetes-validate",
        "checking deploy/kubernetes against the Kubernetes schemas",
    ),
];

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
    apt.install(&[LLVM_DEV_PACKAGE], Recommends::Leave)
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

fn tools(apt: &mut Apt, needs: Needs) -> anyhow::Result<()> {
    let (present, missing): (Vec<&Tool>, Vec<&Tool>) = tools_of_jobs()
        .iter()
        .filter(|tool| needs.wants(tool))
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
    apt.install(&packages, Recommends::Install)?;
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

/// Whether apt also installs the packages' recommendations.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Recommends {
    /// The run path: what the package needs, nothing more.
    Leave,
    Install,
}

impl Apt {
    fn install(&mut self, packages: &[&str], recommends: Recommends) -> anyhow::Result<()> {
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
        install.args(["install", "-y"]);
        if recommends == Recommends::Leave {
            install.arg("--no-install-recommends");
        }
        install
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive");
        cmd::run(&mut install)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commands(needs: Needs) -> Vec<&'static str> {
        let tools = tools_of_jobs().iter().filter(|tool| needs.wants(tool));
        tools.map(|tool| tool.command).collect()
    }

    #[test]
    fn each_job_installs_only_its_own_tools() {
        assert!(
            commands(Needs::Build).is_empty(),
            "the run path installs no tool"
        );
        assert!(commands(Needs::Package).is_empty());
        let test = commands(Needs::Test);
        assert!(test.contains(&"prometheus") && test.contains(&"python3"));
        assert!(test.contains(&"podman"), "the image tests run on the host");
        assert!(!test.contains(&"qemu-system-x86_64") && !test.contains(&"tcpstates"));
        assert_eq!(commands(Needs::Image), ["podman", "musl-gcc", "runc"]);
        assert_eq!(commands(Needs::Bench), ["tcpstates", "tcplife"]);
        let vm = commands(Needs::Vm);
        assert!(vm.contains(&"qemu-system-x86_64") && vm.contains(&"python3"));
        assert_eq!(commands(Needs::All).len(), tools_of_jobs().len());
    }
}
