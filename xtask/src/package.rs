//! `cargo xtask package`: `socktrace_<version>_amd64.deb`, built by cargo-deb
//! (its metadata is in tracer-user/Cargo.toml) from the release binary, the
//! systemd unit of deploy/systemd, and the man page and shell completions
//! that socktrace writes from its own command-line definitions.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::{build, cmd, setup};

/// Builds the package and returns its path.
pub fn package() -> anyhow::Result<PathBuf> {
    setup::run(setup::Needs::Package)?;
    let binary = build::socktrace(false, None)?;
    // cargo-deb finds these under target/release (see the assets).
    let assets = binary
        .parent()
        .context("the binary has no directory")?
        .join("package");
    fs::create_dir_all(&assets)?;
    let generate = |args: &[&str], file: &str| -> anyhow::Result<()> {
        let text = cmd::output(Command::new(&binary).arg("generate").args(args))
            .with_context(|| format!("`socktrace generate {}` failed", args.join(" ")))?;
        fs::write(assets.join(file), text).with_context(|| format!("writing {file}"))
    };
    let man = assets.join("man");
    let _ = fs::remove_dir_all(&man);
    cmd::run(Command::new(&binary).args(["generate", "man"]).arg(&man))?;
    // Debian's man pages are gzipped; -n leaves the time out, for the
    // same bytes on every build.
    for page in fs::read_dir(&man)? {
        cmd::run(Command::new("gzip").arg("-9nf").arg(page?.path()))?;
    }
    generate(&["completions", "bash"], "socktrace.bash")?;
    generate(&["completions", "zsh"], "_socktrace")?;
    generate(&["completions", "fish"], "socktrace.fish")?;

    let out_dir = cmd::target_dir()?.join("debian");
    fs::create_dir_all(&out_dir)?;
    let mut deb = cmd::cargo()?;
    deb.args(["deb", "--package", "tracer-user", "--no-build", "--output"])
        .arg(&out_dir);
    cmd::run(&mut deb)?;
    let version = build::version(&binary)?;
    let path = out_dir.join(format!("socktrace_{version}_amd64.deb"));
    if !path.is_file() {
        bail!("cargo deb succeeded but {} is missing", path.display());
    }
    println!("built {}", path.display());
    Ok(path)
}
