//! Small helpers for running commands and finding things on the host.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The workspace root: every job runs cargo from there.
pub fn workspace_root() -> anyhow::Result<PathBuf> {
    let xtask_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask_dir
        .parent()
        .map(Path::to_path_buf)
        .context("xtask manifest directory has no parent")
}

/// Where `cargo build` puts its output: `$CARGO_TARGET_DIR` or `<root>/target`.
pub fn target_dir() -> anyhow::Result<PathBuf> {
    let root = workspace_root()?;
    Ok(match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    })
}

/// `~/.cargo/bin`, or `$CARGO_HOME/bin`: where `cargo install` puts bpf-linker.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))?;
    Some(cargo_home.join("bin"))
}

/// Puts the cargo bin directory on PATH when it is missing, so that bpf-linker
/// is found right after `cargo install` and by the eBPF build that runs later.
pub fn put_cargo_bin_on_path() {
    let Some(bin) = cargo_bin_dir() else { return };
    let path = env::var_os("PATH").unwrap_or_default();
    if env::split_paths(&path).any(|dir| dir == bin) {
        return;
    }
    if let Ok(joined) = env::join_paths([bin].into_iter().chain(env::split_paths(&path))) {
        // SAFETY: called from `main` before any other thread exists, so nothing
        // can read the environment concurrently.
        unsafe { env::set_var("PATH", joined) };
    }
}

/// PATH with `dir` in front, for one child process.
pub fn path_with(dir: &Path) -> anyhow::Result<OsString> {
    let path = env::var_os("PATH").unwrap_or_default();
    let dirs = [dir.to_path_buf()]
        .into_iter()
        .chain(env::split_paths(&path));
    env::join_paths(dirs).context("building PATH")
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A `cargo` command run from the workspace root.
///
/// It goes through the rustup proxy on PATH rather than `$CARGO`, so that
/// `+nightly` works.
pub fn cargo() -> anyhow::Result<Command> {
    let mut cargo = Command::new("cargo");
    cargo.current_dir(workspace_root()?);
    Ok(cargo)
}

/// Runs a command with inherited stdio, failing if it does not exit with 0.
pub fn run(command: &mut Command) -> anyhow::Result<()> {
    let shown = show(command);
    println!("$ {shown}");
    let status = command
        .status()
        .with_context(|| format!("starting `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs a command quietly and returns its stdout, or None if it could not run
/// or failed. For probes whose failure only means "not there".
pub fn output(command: &mut Command) -> Option<String> {
    let out = command.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The command as a user would type it.
pub fn show(command: &Command) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    words.extend(command.get_args().map(|a| a.to_string_lossy().into_owned()));
    words.join(" ")
}

/// `value` as one word for sh.
pub fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}
